"""What every reference method shares: the model's facts, the notes it returns, uniform shares."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.families import FamilyAdapter, OwnedSlice, adapter_for
from pruning.families.base import LayerCosts
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.planning.scores import StructureScores

logger = logging.getLogger(__name__)

Notes = dict[str, Any]
ReferenceMethod = Callable[[nn.Module, torch.LongTensor, float, int], Notes]


def count_params(model: nn.Module) -> int:
    """All parameters, a tied embedding once (``parameters()`` de-duplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelFacts:
    """What every method asks about the model: its family adapter, head width, layers and their costs."""

    adapter: FamilyAdapter
    head_dim: int
    layers: nn.ModuleList
    costs: list[LayerCosts]


def describe(model: nn.Module) -> ModelFacts:
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    layers = adapter.decoder_layers(model)
    return ModelFacts(adapter, head_dim, layers, [adapter.costs(layer, head_dim) for layer in layers])


def output_projection(adapter: FamilyAdapter, layer: nn.Module, head_dim: int, kind: str) -> OwnedSlice:
    """The Linear whose input columns structures of ``kind`` own (o_proj, down_proj): what they write."""
    geometry = adapter.geometry(layer, head_dim)
    return next(o for o in adapter.owned_slices(kind, geometry) if o.axis == 1)


def method_notes(
    method: str, model: nn.Module, before: int, ratio: float, plan: PruningPlan | None, **extra: Any
) -> Notes:
    after = count_params(model)
    notes: Notes = {
        "method": method,
        "ratio": ratio,
        "params_before": before,
        "params_after": after,
        "removed_share": (before - after) / before,
    }
    if plan is not None:
        notes["removed_kv_groups"] = sum(len(lp.remove_kv_groups) for lp in plan.layers)
        notes["removed_channels"] = sum(len(lp.remove_channels) for lp in plan.layers)
        notes["attention_blocks_removed"] = [lp.layer_idx for lp in plan.layers if lp.attention_removed]
        notes["mlp_blocks_removed"] = [lp.layer_idx for lp in plan.layers if lp.mlp_removed]
    notes.update(extra)
    logger.info(
        "%s: removed %.2f%% of all parameters (%s -> %s)",
        method,
        100 * notes["removed_share"],
        f"{before:,}",
        f"{after:,}",
    )
    return notes


# ---------------------------------------------------------------------------------------- uniform shares


@dataclass(frozen=True)
class UniformCounts:
    """The same number of KV groups and MLP channels removed from each of ``layers``."""

    kv_groups: int
    channels: int
    layers: tuple[int, ...]


def _removed_per_layer(lc: LayerCosts, kv_groups: int, channels: int) -> int:
    removed = kv_groups * lc.kv_group_cost + channels * lc.channel_cost
    if kv_groups == lc.num_kv_groups:
        removed += lc.attention_block_cost
    if channels == lc.num_channels:
        removed += lc.mlp_block_cost
    return removed


def uniform_counts(costs: Sequence[LayerCosts], target: float, layers: Sequence[int]) -> UniformCounts:
    """Counts for a uniform share: the share of each layer's prunable parameters the target needs,
    KV groups rounded to the nearest whole group (there are few), then the fewest channels that make
    the total reach ``target``. The overshoot is below one channel per layer.

    Raises ValueError for layers of different shapes (an already pruned model) or an unreachable target.
    """
    layers = tuple(layers)
    shapes = {
        (costs[i].num_kv_groups, costs[i].num_channels, costs[i].kv_group_cost, costs[i].channel_cost)
        for i in layers
    }
    if len(shapes) != 1:
        raise ValueError(
            f"a uniform share needs layers of one shape; layers {list(layers)} have {len(shapes)}"
        )
    lc, n = costs[layers[0]], len(layers)

    def total(k: int, c: int) -> int:
        return n * _removed_per_layer(lc, k, c)

    if total(lc.num_kv_groups, lc.num_channels) < target:
        raise ValueError(f"layers {list(layers)} hold fewer than the {target:,.0f} parameters to remove")
    share = target / total(lc.num_kv_groups, lc.num_channels)
    k = min(round(share * lc.num_kv_groups), lc.num_kv_groups)
    while k > 0 and total(k, 0) > target:
        k -= 1
    while total(k, lc.num_channels) < target:
        k += 1
    lo, hi = 0, lc.num_channels  # the fewest channels with total(k, c) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if total(k, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return UniformCounts(k, lo, layers)


def uniform_plan(
    costs: Sequence[LayerCosts],
    scores: StructureScores,
    counts: UniformCounts,
    criterion: str,
    before: int,
    target: float,
) -> PruningPlan:
    """Remove the lowest-scoring ``counts`` structures of each counted layer (stable sort: ties by index)."""
    plans = []
    for idx, lc in enumerate(costs):
        groups: tuple[int, ...] = ()
        channels: tuple[int, ...] = ()
        if idx in counts.layers:
            groups = tuple(torch.argsort(scores.attention[idx], stable=True)[: counts.kv_groups].tolist())
            channels = tuple(torch.argsort(scores.mlp[idx], stable=True)[: counts.channels].tolist())
        plans.append(LayerPlan(idx, lc.num_kv_groups, lc.num_channels, groups, channels))
    removed = sum(_removed_per_layer(costs[i], counts.kv_groups, counts.channels) for i in counts.layers)
    return PruningPlan(
        layers=tuple(plans),
        criterion=criterion,
        params_before=before,
        params_target=before - round(target),
        params_planned=before - removed,
        extra={"uniform": True},
    )


def uniform_notes(counts: UniformCounts, costs: Sequence[LayerCosts]) -> Notes:
    lc = costs[counts.layers[0]]
    return {
        "pruned_layers": f"{counts.layers[0]}..{counts.layers[-1]} ({len(counts.layers)} of {len(costs)})",
        "per_layer_kv_groups": f"{counts.kv_groups} of {lc.num_kv_groups}",
        "per_layer_channels": f"{counts.channels} of {lc.num_channels}",
        "per_layer_share": round(
            _removed_per_layer(lc, counts.kv_groups, counts.channels)
            / _removed_per_layer(lc, lc.num_kv_groups, lc.num_channels),
            4,
        ),
    }
