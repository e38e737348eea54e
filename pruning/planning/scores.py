"""What criteria hand the planner: one score per structure of every layer, and whether they share a scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class StructureScores:
    """Per layer: one score per KV group (empty when attention is gone) and one per MLP channel.

    ``common_scale`` says the criterion already put every structure of every layer on one scale (a
    share of the residual stream's energy, a loss change); otherwise the planner normalises per type.
    """

    attention: list[torch.Tensor]
    mlp: list[torch.Tensor]
    common_scale: bool = False
