"""The ``obs_fisher`` criterion: ``obs`` weighted by how much the loss cares about each output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pruning.calibration.engine import calibrate
from pruning.calibration.fisher import output_fisher
from pruning.criteria.obs import ObsCriterion
from pruning.criteria.refit_error import RefitErrorObserver
from pruning.errors import UserError
from pruning.planning.scores import StructureScores


def evenly_spaced(windows: torch.LongTensor, count: int | None) -> torch.LongTensor:
    """``count`` of the windows, evenly spaced (all of them for None): a mix's windows come source after
    source, so a spread subset keeps each source's share where the first ``count`` would not."""
    total = windows.shape[0]
    if count is None or count >= total:
        return windows
    if count < 1:
        raise UserError(f"calibration.fisher_samples must be >= 1 (got {count})")
    picks = torch.linspace(0, total - 1, count).round().long()
    return windows[picks]


@dataclass
class FisherObsCriterion(ObsCriterion):
    """``obs`` with each removal's output error weighted, per output row, by how much the loss cares
    about it (``pruning.calibration.fisher``) instead of divided by the residual stream's energy.
    The Fisher backward runs layer by layer like the rest (streamed models too) unless the engine is
    ``whole_model``; ``fisher_samples`` runs it on fewer windows than the Gram statistics."""

    name: ClassVar[str] = "obs_fisher"
    needs_backward: ClassVar[bool] = True
    fisher_samples: int | None = None

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        subset = evenly_spaced(windows, self.fisher_samples)
        weights = output_fisher(model, subset, self.batch_size, self.engine, self.store)
        observer = RefitErrorObserver(model, self.ridge, self.error_function(), weights)
        calibrate(model, windows, self.batch_size, [observer], self.engine, self.store)
        return observer.scores()
