"""Two baselines: ``random`` scores on the global ranking, and ``magnitude_uniform``."""

from __future__ import annotations

import torch
from torch import nn

from pruning.criteria.base import Importance, layer_structure_scores
from pruning.families import OwnedSlice
from pruning.planning.planner import plan_global
from pruning.planning.scores import StructureScores
from pruning.surgery import apply_plan

from .common import Notes, count_params, describe, method_notes, uniform_counts, uniform_notes, uniform_plan


def random(
    model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int, seed: int = 0
) -> Notes:
    """Uniform random scores for every structure, ranked globally by this project's planner.

    The planner divides by cost and by each type's median, so a KV group and a channel are equally
    likely to go per parameter they free. Needs no data.
    """
    m = describe(model)
    before = count_params(model)
    gen = torch.Generator().manual_seed(seed)
    scores = StructureScores(
        attention=[torch.rand(lc.num_kv_groups, generator=gen) for lc in m.costs],
        mlp=[torch.rand(lc.num_channels, generator=gen) for lc in m.costs],
    )
    plan = plan_global(model, scores, ratio, "total", criterion="random")
    apply_plan(model, plan)
    return method_notes("random", model, before, ratio, plan, seed=seed)


def magnitude_uniform(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """Within each layer, the structures whose owned weights have the smallest L2 norm go.

    L2 over every weight a structure owns (q/k/v rows and o_proj columns of a KV group; gate/up rows and
    the down_proj column of a channel), the same counts in every layer. FLAP's ``mag_sp`` baseline uses
    only the output projection's columns; this reads all the structure's weights, as LLM-Pruner's L2
    does. Needs no data.
    """
    m = describe(model)
    before = count_params(model)
    target = ratio * before

    def squares(idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
        bias = linear.bias.detach().float().pow(2) if linear.bias is not None and owned.axis == 0 else None
        return linear.weight.detach().float().pow(2), bias

    attention, mlp = [], []
    for idx, layer in enumerate(m.layers):
        a, c = layer_structure_scores(m.adapter, layer, idx, m.head_dim, squares)
        attention.append(a.sqrt())
        mlp.append(c.sqrt())
    counts = uniform_counts(m.costs, target, range(len(m.layers)))
    plan = uniform_plan(m.costs, StructureScores(attention, mlp), counts, "magnitude_uniform", before, target)
    apply_plan(model, plan)
    return method_notes(
        "magnitude_uniform",
        model,
        before,
        ratio,
        plan,
        norm="L2 over all owned weights",
        **uniform_notes(counts, m.costs),
    )
