"""Shapes an engine wants: the same sizes in every layer (``uniform``) and kept counts in multiples.

A global ranking gives every layer its own head count and intermediate size. That is the best use of a
parameter budget, but only this package's loader (or the modeling code shipped with the checkpoint)
can build such a model. ``uniform`` keeps one count of KV groups and one of MLP channels in every
layer, so the checkpoint has a stock config that stock transformers, vLLM and llama.cpp's own converter
load unchanged; ``multiple_of`` / ``heads_multiple_of`` round kept channels and kept query heads down to
multiples GPU kernels like.

The global ranking still decides. With ``multiple_of`` / ``heads_multiple_of`` alone it ranks chunks
instead of single structures (``select_aligned``): each block's structures, cheapest first, cut so that
every chunk leaves an allowed count, the cheapest chunk of any block next, and the plan stops at the
chunk boundary nearer the target (before or after it), so the ratio is kept to within half a chunk.
With ``uniform``, the non-uniform selection's share of attention and MLP, spread evenly, sets the
sizes, and each layer loses its lowest-ranked structures; rounding there only removes more.
"""

from __future__ import annotations

import heapq
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


def step_of(shape: KeptShape, kind: str, group_size: int) -> int:
    """Structures per chunk: kept counts must be multiples of it (a KV group has ``group_size`` query
    heads, so kept query heads in multiples of ``heads_multiple_of`` means kept groups in multiples of
    ``heads_multiple_of / gcd(heads_multiple_of, group_size)``)."""
    if kind == MLP:
        return shape.multiple_of
    return shape.heads_multiple_of // math.gcd(shape.heads_multiple_of, group_size)


@dataclass(frozen=True)
class Chunk:
    """Structures of one block that go together, so that what the block keeps stays an allowed count."""

    value: float  # the mean normalised value of its structures
    cost: int  # their parameters, with the block's own when the chunk empties it
    members: tuple[tuple[int, str, int], ...]  # (layer, kind, index) of each


def block_chunks(ranked_block: Sequence, size: int, step: int, minimum: int, block_cost: int) -> list[Chunk]:
    """One block's chunks, cheapest first: its ranked structures cut so that after each chunk the kept
    count is a multiple of ``step`` (the first chunk takes the remainder ``size % step``), never below
    ``minimum`` rounded up to a multiple; a chunk that empties the block carries its own cost too."""
    floor = math.ceil(minimum / step) * step
    sizes = ([size % step] if size % step else []) + [step] * (size // step)
    chunks: list[Chunk] = []
    kept, start = size, 0
    for n in sizes:
        if kept - n < floor:
            break
        members = ranked_block[start : start + n]
        start, kept = start + n, kept - n
        cost = sum(c.cost for c in members) + (block_cost if kept == 0 else 0)
        value = sum(c.value for c in members) / n
        chunks.append(Chunk(value, cost, tuple((c.layer_idx, c.kind, c.index) for c in members)))
    return chunks


def select_aligned(
    ranked: Sequence,
    costs: Sequence[LayerCosts],
    target: float,
    protected: set[int],
    minimum: dict[str, int],
    shape: KeptShape,
) -> list:
    """The global ranking, by chunks: every block's structures cut into chunks that keep allowed counts
    (``block_chunks``), then the cheapest chunk of any block (by its structures' mean value) taken
    next, until the removed parameters reach the target. The plan then stops at whichever chunk
    boundary is nearer the target, just before or just after it: rounding goes both ways and the ranking
    decides where, so a 20% target removes 20% to within half a chunk. A block the ranking never
    reaches keeps its size, allowed or not.

    ``ranked`` are ``pruning.planning.planner.Candidate``s, least valuable first; so is the result."""
    per_block: dict[tuple[int, str], list] = {}
    for cand in ranked:
        if cand.layer_idx not in protected:
            per_block.setdefault((cand.layer_idx, cand.kind), []).append(cand)
    chunks: dict[tuple[int, str], list[Chunk]] = {}
    for (layer, kind), block in per_block.items():
        lc = costs[layer]
        size = lc.num_kv_groups if kind == ATTENTION else lc.num_channels
        step = step_of(shape, kind, lc.geometry.group_size)
        chunks[(layer, kind)] = block_chunks(block, size, step, minimum[kind], lc.block_cost(kind))
    heap = [(found[0].value, key, 0) for key, found in chunks.items() if found]
    heapq.heapify(heap)
    taken: list[Chunk] = []
    before = total = 0
    while total < target:
        if not heap:
            raise UserError(
                f"pruning: with multiple_of={shape.multiple_of}, heads_multiple_of={shape.heads_multiple_of} "
                f"and the minimums {minimum}, at most {total:,} parameters can go, short of the target "
                f"{round(target):,}; lower the ratio, the minimums or the multiples"
            )
        _, key, idx = heapq.heappop(heap)
        taken.append(chunks[key][idx])
        before, total = total, total + chunks[key][idx].cost
        if idx + 1 < len(chunks[key]):
            heapq.heappush(heap, (chunks[key][idx + 1].value, key, idx + 1))
    if len(taken) > 1 and target - before < total - target:
        taken.pop()  # the boundary just short of the target is the nearer one
    chosen = {member for chunk in taken for member in chunk.members}
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
