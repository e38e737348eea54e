"""The correctness oracle: what a pruned model must compute, made without surgery.

Zeroing a structure's rows makes its heads or channel compute 0, zeroing its output columns makes it
write 0, so a dense model with the plan's structures zeroed computes exactly what the pruned model
computes. ``zero_plan_structures`` zeroes what ``pruning.surgery.apply_plan`` removes, reading the same
adapter declarations, and lives here, with the tests that compare the two, not in the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruning.families import KINDS
from pruning.planning.plan import PruningPlan
from pruning.surgery import check_plan, removed_by


@torch.no_grad()
def _zero_out(linear: nn.Linear, rows: Sequence[int]) -> None:
    if rows:
        index = torch.tensor(list(rows), dtype=torch.long, device=linear.weight.device)
        linear.weight.index_fill_(0, index, 0.0)
        if linear.bias is not None:
            linear.bias.index_fill_(0, index, 0.0)


@torch.no_grad()
def _zero_in(linear: nn.Linear, cols: Sequence[int]) -> None:
    if cols:
        index = torch.tensor(list(cols), dtype=torch.long, device=linear.weight.device)
        linear.weight.index_fill_(1, index, 0.0)


def zero_plan_structures(model: nn.Module, plan: PruningPlan) -> None:
    """Zero, in place and without changing shapes, exactly what ``apply_plan`` would remove.

    Zeroed rows make a head or channel compute 0, zeroed output columns make it write 0. For a fully
    removed block the output projections' biases are zeroed too, so the block outputs exactly 0 like its
    Zero* replacement (a norm before it then has no effect, and a post-norm of 0 is 0).
    """
    adapter, _, paired = check_plan(model, plan)
    for layer, lp, geo in paired:
        for kind in KINDS:
            structures, emptied = removed_by(lp, kind)
            if not structures:
                continue
            for owned in adapter.owned_slices(kind, geo):
                linear = layer.get_submodule(owned.path)
                (_zero_out if owned.axis == 0 else _zero_in)(linear, owned.indices(structures))
                if emptied and owned.axis == 1 and linear.bias is not None:
                    with torch.no_grad():
                        linear.bias.zero_()
