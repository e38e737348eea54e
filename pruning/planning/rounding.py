"""Shapes an engine wants: the same sizes in every layer (``uniform``) and kept counts in multiples.

A global ranking gives every layer its own head count and intermediate size. That is the best use of a
parameter budget, but only this package's loader (or the modeling code shipped with the checkpoint)
can build such a model. ``uniform`` keeps one count of KV groups and one of MLP channels in every
layer, so the checkpoint has a stock config that stock transformers, vLLM and llama.cpp's own converter
load unchanged; ``multiple_of`` / ``heads_multiple_of`` round kept channels and kept query heads down to
multiples GPU kernels like.

The global ranking still decides: how much each kind loses (the non-uniform selection's share of
attention and MLP, spread evenly) and which structures each layer loses (its lowest-ranked ones).
Rounding only ever removes more, so the target is always reached; the plan's log line gives what was
removed next to the target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pruning.errors import UserError
from pruning.families import ATTENTION, MLP
from pruning.families.base import LayerCosts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptShape:
    """Constraints on what each layer keeps, beyond the per-layer minimums."""

    uniform: bool = False
    multiple_of: int = 1  # kept MLP channels per layer
    heads_multiple_of: int = 1  # kept query heads per layer

    def __post_init__(self) -> None:
        if self.multiple_of < 1 or self.heads_multiple_of < 1:
            raise ValueError(
                f"multiple_of and heads_multiple_of must be >= 1, got {self.multiple_of}, "
                f"{self.heads_multiple_of}"
            )

    @property
    def is_free(self) -> bool:
        return not self.uniform and self.multiple_of == 1 and self.heads_multiple_of == 1

    def channels_ok(self, kept: int) -> bool:
        """A kept channel count this shape allows (0, an emptied block, is a multiple of everything)."""
        return kept % self.multiple_of == 0

    def groups_ok(self, kept: int, group_size: int) -> bool:
        """A kept KV-group count whose query heads (``kept * group_size``) are a multiple."""
        return (kept * group_size) % self.heads_multiple_of == 0


def round_per_layer(
    ranked: Sequence,
    removed: Sequence,
    costs: Sequence[LayerCosts],
    shape: KeptShape,
    minimum: dict[str, int],
) -> list:
    """Remove each pruned layer's next lowest-ranked structures until its kept counts are allowed.

    ``ranked``/``removed`` are ``pruning.planning.planner.Candidate`` lists; the result keeps ranked order. A
    layer the selection did not touch keeps its size; one that would have to go below its minimum to
    reach an allowed count is refused.
    """
    taken = {(c.layer_idx, c.kind, c.index) for c in removed}
    kept = _kept_counts(costs, removed)
    extra = []
    for cand in ranked:
        key = (cand.layer_idx, cand.kind)
        if (
            (cand.layer_idx, cand.kind, cand.index) in taken
            or kept[key] == 0
            or _allowed(shape, costs, key, kept)
        ):
            continue
        # Only layers already pruned get rounded: an untouched (or protected) layer keeps its size.
        if kept[key] == _size(costs, key):
            continue
        if kept[key] <= minimum[cand.kind]:
            raise UserError(
                f"pruning: layer {cand.layer_idx} keeps {kept[key]} {cand.kind} structures, its minimum, "
                f"which is not an allowed multiple (multiple_of={shape.multiple_of}, heads_multiple_of="
                f"{shape.heads_multiple_of}); lower the minimum or change the multiple"
            )
        kept[key] -= 1
        extra.append(cand)
    chosen = {(c.layer_idx, c.kind, c.index) for c in extra} | taken
    return [c for c in ranked if (c.layer_idx, c.kind, c.index) in chosen]


def select_uniform(
    ranked: Sequence,
    free_selection: Sequence,
    costs: Sequence[LayerCosts],
    target: float,
    shape: KeptShape,
    min_kv_groups: int,
    min_channels: int,
    stock_accepts: Callable[[int], bool] = lambda kept_groups: True,
) -> list:
    """One count of KV groups and one of channels for every layer; each layer loses its lowest-ranked.

    ``free_selection`` is the unconstrained global selection: its share of attention decides how many KV
    groups every layer loses, and the channels then make up the rest of the target. ``stock_accepts``
    says whether the family's stock config takes a kept group count (transformers' Llama and Gemma
    configs refuse a hidden size that is no multiple of the head count, even with ``head_dim`` set).
    """
    first = costs[0]
    if any(lc != first for lc in costs):
        raise UserError(
            "pruning.uniform: the model's layers differ in size already (was it pruned before?); a "
            "uniform plan needs layers of one shape"
        )
    layers, groups, channels = len(costs), first.num_kv_groups, first.num_channels
    group_size = first.geometry.group_size
    wanted_groups = groups - round(sum(c.kind == ATTENTION for c in free_selection) / layers)
    feasible = [k for k in range(max(min_kv_groups, 1), groups + 1) if shape.groups_ok(k, group_size)]
    if not feasible:
        raise UserError(
            f"pruning: no kept count of {groups} KV groups (of {group_size} query heads each) is at least "
            f"min_kv_groups={min_kv_groups} and a multiple of heads_multiple_of={shape.heads_multiple_of} "
            "in query heads"
        )
    refused = [k for k in feasible if not stock_accepts(k)]
    feasible = [k for k in feasible if k not in refused]
    if refused:
        logger.info("pruning.uniform: the stock config refuses %s kept KV groups per layer", refused)
    # Nearest allowed count first, then fewer groups (the channels may not make up the target alone).
    for kept_groups in sorted(feasible, key=lambda k: (abs(k - wanted_groups), k)):
        attention_cost = layers * (groups - kept_groups) * first.kv_group_cost
        needed = max(target - attention_cost, 0.0)
        remove_channels = math.ceil(needed / (layers * first.channel_cost)) if needed else 0
        kept_channels = (channels - remove_channels) // shape.multiple_of * shape.multiple_of
        if kept_channels >= max(min_channels, 1):
            return _lowest_per_layer(ranked, layers, groups - kept_groups, channels - kept_channels)
    raise UserError(
        f"pruning.uniform: no count of KV groups and channels kept in every layer reaches the target with "
        f"min_kv_groups={min_kv_groups}, min_channels={min_channels}, multiple_of={shape.multiple_of}, "
        f"heads_multiple_of={shape.heads_multiple_of}; lower the ratio"
    )


def _lowest_per_layer(ranked: Sequence, layers: int, remove_groups: int, remove_channels: int) -> list:
    wanted = {ATTENTION: remove_groups, MLP: remove_channels}
    taken = {(idx, kind): 0 for idx in range(layers) for kind in (ATTENTION, MLP)}
    chosen = []
    for cand in ranked:
        key = (cand.layer_idx, cand.kind)
        if taken[key] < wanted[cand.kind]:
            taken[key] += 1
            chosen.append(cand)
    return chosen


def _size(costs: Sequence[LayerCosts], key: tuple[int, str]) -> int:
    lc = costs[key[0]]
    return lc.num_kv_groups if key[1] == ATTENTION else lc.num_channels


def _kept_counts(costs: Sequence[LayerCosts], removed: Sequence) -> dict[tuple[int, str], int]:
    kept = {(idx, kind): _size(costs, (idx, kind)) for idx in range(len(costs)) for kind in (ATTENTION, MLP)}
    for cand in removed:
        kept[(cand.layer_idx, cand.kind)] -= 1
    return kept


def _allowed(shape: KeptShape, costs: Sequence[LayerCosts], key: tuple[int, str], kept: dict) -> bool:
    if key[1] == MLP:
        return shape.channels_ok(kept[key])
    return shape.groups_ok(kept[key], costs[key[0]].geometry.group_size)
