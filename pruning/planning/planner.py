"""Global planning: rank every KV group and MLP channel of every layer on one scale, remove the cheapest.

Steps, each a small function so that allocation by measured sensitivity can later replace the ranking
without touching costs or the plan format:

1. ``FamilyAdapter.costs``: parameters each structure owns, read from module shapes (pruned layers
   differ), and what goes with a block's last structure.
2. ``normalized_candidates``: score / cost (importance per parameter), divided by the median of its
   type over all layers. Attention and MLP scores live on different scales (different inputs, sizes
   and criteria); the median makes each type's typical structure worth 1, so they compete fairly.
3. ``rank_candidates``: ascending by that value, ties broken by position for determinism.
4. ``select_for_removal``: walk the ranking, skipping protected layers and structures that would take
   a layer below its minimum, until the removed cost first reaches the target.
5. ``pruning.planning.rounding``: where the config asks for it, the same sizes in every layer (``uniform``)
   or kept counts in multiples; the ranking still decides which structures go.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PretrainedConfig

from pruning.errors import UserError
from pruning.families import ATTENTION, MLP, adapter_for
from pruning.families.base import LayerCosts
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.planning.rounding import KeptShape, select_aligned, select_uniform
from pruning.planning.scores import StructureScores

logger = logging.getLogger(__name__)

RATIO_OF = ("total", "layers")


@dataclass(frozen=True)
class Candidate:
    """One removable structure with its normalised importance per parameter."""

    value: float
    layer_idx: int
    kind: str
    index: int
    cost: int


def _type_scale(values: torch.Tensor) -> float:
    """The median, or a positive fallback when the median is 0 (e.g. most scores exactly zero)."""
    median = float(values.median())
    if median > 0:
        return median
    mean = float(values.mean())
    return mean if mean > 0 else 1.0


def normalized_candidates(scores: StructureScores, costs: Sequence[LayerCosts]) -> list[Candidate]:
    """Every structure of every layer with value = score / cost, divided by its type's median unless
    the criterion says its scores already share one scale (``StructureScores.common_scale``)."""
    if len(scores.attention) != len(costs) or len(scores.mlp) != len(costs):
        raise ValueError(
            f"scores cover {len(scores.attention)}/{len(scores.mlp)} layers, the model has {len(costs)}"
        )
    per_type: dict[str, list[tuple[int, torch.Tensor, int]]] = {ATTENTION: [], MLP: []}
    for idx, lc in enumerate(costs):
        for kind, s, count, cost in (
            (ATTENTION, scores.attention[idx], lc.num_kv_groups, lc.kv_group_cost),
            (MLP, scores.mlp[idx], lc.num_channels, lc.channel_cost),
        ):
            if s.numel() != count:
                raise ValueError(f"layer {idx}: {s.numel()} {kind} scores for {count} structures")
            if count:
                per_type[kind].append((idx, s.detach().double().cpu() / cost, cost))
    out: list[Candidate] = []
    for kind, entries in per_type.items():
        if not entries:
            continue
        everything = torch.cat([v for _, v, _ in entries])
        if not torch.isfinite(everything).all():
            raise UserError(
                f"pruning: {kind} scores contain NaN or infinity; safetensors source weights are checked "
                "finite as they are read, so the calibration passes overflowed (in float16 any activation "
                "beyond 65504 does: use model.dtype bfloat16 or float32)"
            )
        scale = 1.0 if scores.common_scale else _type_scale(everything)
        for idx, values, cost in entries:
            out.extend(Candidate(v / scale, idx, kind, j, cost) for j, v in enumerate(values.tolist()))
    return out


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Least valuable first; position breaks ties so equal scores give the same plan every run."""
    return sorted(candidates, key=lambda c: (c.value, c.layer_idx, c.kind, c.index))


def removable_cost(
    costs: Sequence[LayerCosts], protected: set[int], min_kv_groups: int, min_channels: int
) -> int:
    """The most parameters the constraints allow to remove."""
    return sum(
        max(lc.num_kv_groups - min_kv_groups, 0) * lc.kv_group_cost
        + max(lc.num_channels - min_channels, 0) * lc.channel_cost
        for idx, lc in enumerate(costs)
        if idx not in protected
    )


def select_for_removal(
    ranked: Sequence[Candidate],
    costs: Sequence[LayerCosts],
    target: float,
    protected: set[int],
    min_kv_groups: int,
    min_channels: int,
) -> list[Candidate]:
    """Take structures in ranked order until their cost first reaches ``target``.

    Stopping at the first structure that reaches it overshoots by less than one structure's cost.
    """
    removed: list[Candidate] = []
    if target <= 0:
        return removed
    kept = {(idx, ATTENTION): lc.num_kv_groups for idx, lc in enumerate(costs)}
    kept.update({(idx, MLP): lc.num_channels for idx, lc in enumerate(costs)})
    minimum = {ATTENTION: min_kv_groups, MLP: min_channels}
    total = 0
    for cand in ranked:
        key = (cand.layer_idx, cand.kind)
        if cand.layer_idx in protected or kept[key] <= minimum[cand.kind]:
            continue
        kept[key] -= 1
        removed.append(cand)
        total += cand.cost
        if kept[key] == 0:
            total += costs[cand.layer_idx].block_cost(cand.kind)
        if total >= target:
            break
    return removed


def _check_arguments(
    ratio: float, ratio_of: str, protected: set[int], num_layers: int, min_kv_groups: int, min_channels: int
) -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio_of not in RATIO_OF:
        raise UserError(f"ratio_of must be one of {', '.join(RATIO_OF)}, got {ratio_of!r}")
    bad = sorted(i for i in protected if not 0 <= i < num_layers)
    if bad:
        raise UserError(f"protected_layers {bad} out of range: the model has layers 0..{num_layers - 1}")
    if min_kv_groups < 0 or min_channels < 0:
        raise UserError(f"min_kv_groups and min_channels must be >= 0, got {min_kv_groups}, {min_channels}")


def plan_global(
    model: nn.Module,
    scores: StructureScores,
    ratio: float,
    ratio_of: str = "total",
    protected_layers: Sequence[int] = (),
    min_kv_groups: int = 0,
    min_channels: int = 0,
    criterion: str = "",
    *,
    shape: KeptShape = KeptShape(),  # noqa: B008 (frozen, so one shared default is safe)
) -> PruningPlan:
    """Plan removal of ``ratio`` of the model's parameters (``ratio_of`` "total") or of its decoder layers'.

    ``shape`` asks for the same sizes in every layer or for kept counts in multiples
    (``pruning.planning.rounding``): multiples land within half a chunk of the target, on either side;
    ``uniform`` removes more, never less.

    ``params_before`` / ``params_target`` / ``params_planned`` are model sizes: now, wanted, and what
    applying this plan gives (at most one structure below the target size, unless ``shape`` rounds).
    """
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    protected = set(protected_layers)
    _check_arguments(ratio, ratio_of, protected, len(layers), min_kv_groups, min_channels)
    head_dim = adapter.head_dim(model.config)
    costs = [adapter.costs(layer, head_dim) for layer in layers]
    params_before = sum(p.numel() for p in model.parameters())
    denominator = params_before if ratio_of == "total" else sum(p.numel() for p in layers.parameters())
    target = ratio * denominator

    reachable = removable_cost(costs, protected, min_kv_groups, min_channels)
    if reachable < target:
        raise UserError(
            f"cannot remove {ratio:.2%} of {ratio_of} parameters: with protected_layers="
            f"{sorted(protected)}, min_kv_groups={min_kv_groups}, min_channels={min_channels} the reachable "
            f"ratio is {reachable / denominator:.2%} ({reachable:,} parameters)"
        )
    ranked = rank_candidates(normalized_candidates(scores, costs))
    if not shape.is_free and not shape.uniform:  # multiples: the ranking takes chunks, not structures
        minimum = {ATTENTION: min_kv_groups, MLP: min_channels}
        removed = select_aligned(ranked, costs, target, protected, minimum, shape)
    else:
        removed = select_for_removal(ranked, costs, target, protected, min_kv_groups, min_channels)
    if shape.uniform:
        if protected:
            raise UserError("pruning.uniform cannot keep protected_layers whole: every layer gets one size")
        accepts = partial(_stock_config_accepts, model.config, costs[0].geometry.group_size, head_dim)
        removed = select_uniform(
            ranked, removed, costs, target, shape, min_kv_groups, min_channels, stock_accepts=accepts
        )
    plan = _build_plan(costs, removed, criterion, params_before, denominator, ratio, ratio_of)
    if shape.is_free:
        return plan
    extra = {**plan.extra, "shape": asdict(shape)}
    return replace(plan, extra=extra)


def _stock_config_accepts(config: PretrainedConfig, group_size: int, head_dim: int, kept_groups: int) -> bool:
    """Whether the family's own config class takes these head counts (what a uniform checkpoint's stock
    config.json will hold); transformers validates some combinations away (Llama: hidden_size must be a
    multiple of the head count)."""
    values = {
        **config.to_dict(),
        "num_attention_heads": kept_groups * group_size,
        "num_key_value_heads": kept_groups,
        "head_dim": head_dim,
    }
    try:
        type(config)(**values)
    except (ValueError, TypeError, StrictDataclassError):  # what config validation raises
        return False
    return True


def _build_plan(
    costs: Sequence[LayerCosts],
    removed: Sequence[Candidate],
    criterion: str,
    params_before: int,
    denominator: int,
    ratio: float,
    ratio_of: str,
) -> PruningPlan:
    target = round(ratio * denominator)
    groups: dict[int, list[int]] = {i: [] for i in range(len(costs))}
    channels: dict[int, list[int]] = {i: [] for i in range(len(costs))}
    for cand in removed:
        (groups if cand.kind == ATTENTION else channels)[cand.layer_idx].append(cand.index)
    layer_plans = tuple(
        LayerPlan(
            layer_idx=i,
            num_kv_groups=lc.num_kv_groups,
            num_channels=lc.num_channels,
            remove_kv_groups=tuple(groups[i]),
            remove_channels=tuple(channels[i]),
        )
        for i, lc in enumerate(costs)
    )
    removed_params = sum(c.cost for c in removed) + sum(
        lc.block_cost(kind)
        for lp, lc in zip(layer_plans, costs, strict=True)
        for kind, emptied in ((ATTENTION, lp.attention_removed), (MLP, lp.mlp_removed))
        if emptied
    )
    extra = {
        "ratio": ratio,
        "ratio_of": ratio_of,
        "params_removed": removed_params,
        "removed_ratio": round(removed_params / denominator, 6),
        "removed_kv_groups": sum(len(g) for g in groups.values()),
        "removed_channels": sum(len(c) for c in channels.values()),
        "attention_blocks_removed": [lp.layer_idx for lp in layer_plans if lp.attention_removed],
        "mlp_blocks_removed": [lp.layer_idx for lp in layer_plans if lp.mlp_removed],
    }
    logger.info(
        "plan: remove %d KV groups and %d MLP channels, %s of %s parameters, %.2f%% of %s (target %s, "
        "%.2f%%); blocks emptied: attention %s, mlp %s",
        extra["removed_kv_groups"],
        extra["removed_channels"],
        f"{removed_params:,}",
        f"{params_before:,}",
        100 * extra["removed_ratio"],
        ratio_of,
        f"{target:,}",
        100 * ratio,
        extra["attention_blocks_removed"],
        extra["mlp_blocks_removed"],
    )
    miss = removed_params - target
    if abs(miss) > 0.25 * target and abs(miss) > 0.01 * params_before:  # rounding, not a structure or two
        logger.warning(
            "plan: removes %s parameters, %.0f%% %s than the target %s: the kept shapes the config asks "
            "for (multiple_of, heads_multiple_of, uniform) make chunks that coarse",
            f"{removed_params:,}",
            100 * abs(miss) / max(target, 1),
            "more" if miss > 0 else "less",
            f"{target:,}",
        )
    return PruningPlan(
        layers=layer_plans,
        criterion=criterion,
        params_before=params_before,
        params_target=params_before - target,
        params_planned=params_before - removed_params,
        extra=extra,
    )
