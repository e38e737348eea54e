"""LLM-Pruner block-wise Taylor (``hf_prune.py --block_wise --pruner_type taylor``), middle layers only."""

from __future__ import annotations

import torch
from torch import nn

from pruning.criteria.taylor import TaylorCriterion
from pruning.surgery import apply_plan

from .common import Notes, count_params, describe, method_notes, uniform_counts, uniform_notes, uniform_plan

# LLM-Pruner's LLaMA-7B runs prune layers [4, 30) of 32 (README and scripts/llama_prune.sh): the first
# 4 and last 2 keep everything. Scaled to the model's depth, at least one at each end.
LLM_PRUNER_SKIP_FIRST = 4 / 32
LLM_PRUNER_SKIP_LAST = 2 / 32


def llm_pruner_taylor(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """LLM-Pruner, block-wise, first-order element-wise Taylor ("Element1", ``--taylor param_first``,
    the setting of their ``scripts/llama_prune.sh`` LLaMA-7B ~20% run): a group's importance is
    ``sum |w * dL/dw|`` over every weight of the group (q/k/v rows and o_proj columns of a head, gate/up
    rows and the down_proj column of a channel; per-weight terms summed per channel, channels summed per
    head, group members summed: ``grouping_strategy sum``). That is exactly this project's
    ``TaylorCriterion``, reused here. L: the mean causal-LM loss over all calibration windows (LLM-Pruner
    uses 10 bookcorpus samples of 64 tokens; here the same windows as every row).

    The same counts in every middle layer: LLM-Pruner prunes layers 4..29 of LLaMA-7B's 32 at a group
    ratio of 0.25 for ~20% of the parameters; here the first round(L*4/32) and last round(L*2/32)
    layers (at least one each) keep everything, and the middle layers' share is raised until the total
    reaches the target.
    """
    m = describe(model)
    before = count_params(model)
    target = ratio * before
    n = len(m.layers)
    first = max(1, round(n * LLM_PRUNER_SKIP_FIRST))
    last = max(1, round(n * LLM_PRUNER_SKIP_LAST))
    counts = uniform_counts(m.costs, target, range(first, n - last))
    scores = TaylorCriterion(batch_size=batch_size).score(model, windows)
    plan = uniform_plan(m.costs, scores, counts, "llm_pruner_taylor", before, target)
    apply_plan(model, plan)
    return method_notes(
        "llm_pruner_taylor",
        model,
        before,
        ratio,
        plan,
        taylor="param_first (element-wise |w*g|, summed per group)",
        **uniform_notes(counts, m.costs),
    )
