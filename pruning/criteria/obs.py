"""The ``obs`` criterion: what each removal adds when a block's structures go greedily, each refit."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from pruning.compensation.obs import STEPS, greedy_removal
from pruning.criteria.refit_error import Errors, RefitErrorCriterion


def greedy_errors(
    weight: torch.Tensor, second_moment: torch.Tensor, blocks: torch.Tensor, ridge: float, steps: int = STEPS
) -> torch.Tensor:
    """Per block of columns, the error its removal added when all were removed greedily in ``steps``
    chunks (``pruning.compensation.obs.greedy_removal``)."""
    return greedy_removal(weight, second_moment, blocks, ridge, steps=steps)[1]


@dataclass
class ObsCriterion(RefitErrorCriterion):
    """Score each KV group and MLP channel by the error its removal added when its block's structures
    were removed greedily, each removal refit (``pruning.compensation.obs``): what a set costs, not
    each alone."""

    name: ClassVar[str] = "obs"
    obs_steps: int = STEPS

    def error_function(self) -> Errors:
        return partial(greedy_errors, steps=self.obs_steps)
