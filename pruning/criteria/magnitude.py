"""The ``magnitude`` criterion: weights alone, no calibration text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pruning.calibration.engine import LayerStore
from pruning.criteria.base import Criterion, Importance, score_layers
from pruning.families import OwnedSlice
from pruning.planning.scores import StructureScores


@dataclass
class MagnitudeCriterion(Criterion):
    """sum |W| over a structure's weights. Needs no data; a baseline, useless on its own (docs/quality.md)."""

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False
    store: LayerStore | None = (
        None  # where the layers' weights are (pruning.source.streaming); None: resident
    )

    def score(self, model: nn.Module, windows: torch.LongTensor | None = None) -> StructureScores:
        def importance(layer_idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
            bias = linear.bias.detach().float().abs() if linear.bias is not None else None
            return linear.weight.detach().float().abs(), bias

        return score_layers(model, importance, store=self.store)
