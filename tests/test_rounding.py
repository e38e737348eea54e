"""Uniform plans and kept counts in multiples (pruning.planning.rounding) on the planner's tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.errors import UserError
from pruning.planning.planner import plan_global
from pruning.planning.rounding import KeptShape
from pruning.planning.scores import StructureScores
from pruning.surgery import apply_plan, pruned_layout
from tests.test_planner import LAYERS, C, K, physical_param_count, random_scores, tiny_model, values


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def kept(plan) -> list[tuple[int, int]]:
    return [(lp.num_kv_groups - len(lp.remove_kv_groups), len(lp.keep_channels)) for lp in plan.layers]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_uniform_plan_keeps_one_size_and_reaches_the_target(model: LlamaForCausalLM, ratio: float) -> None:
    scores = random_scores(3)
    plan = plan_global(model, scores, ratio, shape=KeptShape(uniform=True))
    sizes = set(kept(plan))
    assert len(sizes) == 1, sizes
    groups, channels = sizes.pop()
    assert groups >= 1 and channels >= 1
    before = sum(p.numel() for p in model.parameters())
    after = physical_param_count(model, plan)
    assert before - after >= ratio * before
    # Within one channel per layer of the target (the smallest uniform step).
    assert before - after < ratio * before + LAYERS * 3 * model.config.hidden_size
    assert plan.extra["shape"] == {"uniform": True, "multiple_of": 1, "heads_multiple_of": 1}


def test_uniform_plan_removes_each_layers_lowest_ranked(model: LlamaForCausalLM) -> None:
    scores = random_scores(4)
    plan = plan_global(model, scores, 0.3, shape=KeptShape(uniform=True))
    value = values(model, scores)
    for lp in plan.layers:
        for kind, removed, count in (
            ("attention", set(lp.remove_kv_groups), K),
            ("mlp", set(lp.remove_channels), C),
        ):
            gone = [value[(lp.layer_idx, kind, j)] for j in removed]
            stays = [value[(lp.layer_idx, kind, j)] for j in range(count) if j not in removed]
            if gone and stays:
                assert max(gone) <= min(stays)


def test_uniform_follows_the_global_share_of_attention() -> None:
    """One worthless KV group in every layer: the free plan takes them, so must the uniform one."""
    model = tiny_model()
    scores = random_scores(5)
    attention = [torch.tensor([1e6, 1e-6]) for _ in scores.attention]
    scores = StructureScores(attention=attention, mlp=scores.mlp, common_scale=True)
    free = plan_global(model, scores, 0.2)
    assert sum(len(lp.remove_kv_groups) for lp in free.layers) >= LAYERS  # at least one group per layer
    plan = plan_global(model, scores, 0.2, shape=KeptShape(uniform=True))
    assert all(lp.remove_kv_groups == (1,) for lp in plan.layers)


@pytest.mark.parametrize("multiple", [8, 32])
def test_multiple_of_rounds_kept_channels_down(model: LlamaForCausalLM, multiple: int) -> None:
    scores = random_scores(6)
    free = plan_global(model, scores, 0.2)
    plan = plan_global(model, scores, 0.2, shape=KeptShape(multiple_of=multiple))
    for free_lp, lp in zip(free.layers, plan.layers, strict=True):
        n = len(lp.keep_channels)
        assert n % multiple == 0
        assert set(free_lp.remove_channels) <= set(lp.remove_channels)  # rounding only adds removals
        if free_lp.remove_channels:
            assert n > len(free_lp.keep_channels) - multiple
        else:
            assert n == C  # an untouched layer keeps its size


def test_uniform_with_multiples_gives_a_stock_shape(model: LlamaForCausalLM) -> None:
    scores = random_scores(7)
    plan = plan_global(model, scores, 0.3, shape=KeptShape(uniform=True, multiple_of=16, heads_multiple_of=4))
    (groups, channels), *_ = kept(plan)
    assert channels % 16 == 0 and (groups * 2) % 4 == 0  # two query heads per group
    pruned = tiny_model()
    apply_plan(pruned, plan)
    layout = pruned_layout(pruned)
    assert len(set(layout.intermediate_size)) == 1 and len(set(layout.num_attention_heads)) == 1


def test_impossible_head_multiple_is_refused(model: LlamaForCausalLM) -> None:
    with pytest.raises(UserError, match="heads_multiple_of=3"):
        plan_global(model, random_scores(), 0.2, shape=KeptShape(uniform=True, heads_multiple_of=3))


def test_uniform_refuses_protected_layers(model: LlamaForCausalLM) -> None:
    with pytest.raises(UserError, match="protected_layers"):
        plan_global(model, random_scores(), 0.2, protected_layers=[0], shape=KeptShape(uniform=True))


def test_uniform_refuses_layers_of_different_sizes() -> None:
    model = tiny_model()
    plan = plan_global(model, random_scores(), 0.2)
    apply_plan(model, plan)
    scores = StructureScores(
        attention=[torch.rand(len(lp.keep_kv_groups)) for lp in plan.layers],
        mlp=[torch.rand(len(lp.keep_channels)) for lp in plan.layers],
    )
    with pytest.raises(UserError, match="differ in size"):
        plan_global(model, scores, 0.1, shape=KeptShape(uniform=True))


def test_minimum_that_is_no_multiple_is_refused() -> None:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    scores = StructureScores(
        attention=[torch.full((2,), 1e6) for _ in range(2)],
        mlp=[torch.rand(40, generator=gen) for _ in range(2)],
    )
    with pytest.raises(UserError, match="minimum"):
        plan_global(model, scores, 0.3, min_channels=30, shape=KeptShape(multiple_of=16))


def test_bad_multiples_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple_of"):
        KeptShape(multiple_of=0)


def test_uniform_keeps_only_head_counts_the_stock_config_accepts() -> None:
    """transformers' LlamaConfig refuses a hidden size that is no multiple of the head count (even with
    head_dim set), so a uniform Llama never keeps 4 of 5 heads with hidden 90; Mistral's config takes it."""
    from transformers import MistralConfig

    from pruning.planning.planner import _stock_config_accepts

    config = LlamaConfig(hidden_size=90, num_attention_heads=5, num_key_value_heads=5, head_dim=16)
    assert [k for k in range(1, 6) if _stock_config_accepts(config, 1, 16, k)] == [1, 2, 3, 5]
    mistral = MistralConfig(hidden_size=90, num_attention_heads=5, num_key_value_heads=5, head_dim=16)
    assert _stock_config_accepts(mistral, 1, 16, 4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=90,
            intermediate_size=64,
            num_attention_heads=5,
            num_key_value_heads=5,
            head_dim=16,
            num_hidden_layers=2,
            vocab_size=64,
        )  # fmt: skip
    ).eval()
    gen = torch.Generator().manual_seed(1)
    # attention nearly worthless: the free plan would keep about 4 heads per layer, uniform may not
    scores = StructureScores(
        attention=[torch.tensor([1e-9, 1.0, 1.0, 1.0, 1.0]) for _ in range(2)],
        mlp=[torch.rand(64, generator=gen) for _ in range(2)],
        common_scale=True,
    )
    plan = plan_global(model, scores, 0.05, shape=KeptShape(uniform=True))
    assert {len(lp.keep_kv_groups) for lp in plan.layers} <= {1, 2, 3, 5}
