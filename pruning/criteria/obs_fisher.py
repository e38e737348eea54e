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
from pruning.planning.scores import StructureScores


@dataclass
class FisherObsCriterion(ObsCriterion):
    """``obs`` with each removal's output error weighted, per output row, by how much the loss cares
    about it (``pruning.calibration.fisher``) instead of divided by the residual stream's energy.
    Needs a backward through the whole model held in memory (not streamed)."""

    name: ClassVar[str] = "obs_fisher"
    needs_backward: ClassVar[bool] = True
    needs_whole_model: ClassVar[bool] = True

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        weights = output_fisher(model, windows, self.batch_size)
        observer = RefitErrorObserver(model, self.ridge, self.errors, weights)
        calibrate(model, windows, self.batch_size, [observer], self.engine, self.store)
        return observer.scores()
