"""Uniform plans and kept counts in multiples (pruning.planning.rounding) on the planner's tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.errors import UserError
from pruning.families import ATTENTION, MLP
from pruning.families.base import LayerCosts, LayerGeometry
from pruning.planning.planner import Candidate, plan_global
from pruning.planning.rounding import KeptShape, round_per_layer, select_uniform
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


def _odd_model(intermediate: int, heads: int, kv_heads: int) -> LlamaForCausalLM:
    """Two layers whose sizes no tested multiple divides (the planner's model has 128 channels, 2 groups)."""
    config = LlamaConfig(
        hidden_size=48, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=2, vocab_size=128, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _cheap_layer_0_mlp(intermediate: int, kv_heads: int) -> StructureScores:
    """Only layer 0's channels are cheap: the free selection takes those and touches nothing else."""
    gen = torch.Generator().manual_seed(2)
    return StructureScores(
        attention=[torch.full((kv_heads,), 1e6) for _ in range(2)],
        mlp=[torch.rand(intermediate, generator=gen) * 1e-3, torch.rand(intermediate, generator=gen) + 1e3],
        common_scale=True,
    )


def test_a_layer_the_plan_never_touched_keeps_its_size_even_when_no_multiple() -> None:
    """Rounding is for layers the selection already pruned: 100 channels and 3 KV groups (3 query heads,
    an odd count) stay whole in layer 1, and layer 0 keeps its 3 untouched groups, though neither count is
    a multiple of 16 or 2; only layer 0's pruned channels are rounded."""
    model = _odd_model(intermediate=100, heads=3, kv_heads=3)
    scores = _cheap_layer_0_mlp(100, 3)
    free = plan_global(model, scores, 0.1)
    assert kept(free)[1] == (3, 100) and kept(free)[0][0] == 3 and kept(free)[0][1] % 16  # as intended
    plan = plan_global(model, scores, 0.1, shape=KeptShape(multiple_of=16, heads_multiple_of=2))
    (groups_0, channels_0), layer_1 = kept(plan)
    assert layer_1 == (3, 100)
    assert groups_0 == 3 and channels_0 % 16 == 0 and kept(free)[0][1] - 16 < channels_0 < kept(free)[0][1]


def _mlp_candidates(channels: int) -> list[Candidate]:
    return [Candidate(float(i), 0, MLP, i, 1) for i in range(channels)]


def _costs(channels: int) -> list[LayerCosts]:
    return [LayerCosts(LayerGeometry(4, 2, 16, channels), kv_group_cost=10, channel_cost=1)]


@pytest.mark.parametrize("removed", [5, 7])
def test_rounding_never_goes_below_a_minimum_one_above_a_multiple(removed: int) -> None:
    """40 channels, minimum 33, multiple_of 16: the free selection kept 35 (or 33, the minimum) and the
    next allowed count, 32, is one below the minimum: refused, not silently undercut."""
    ranked = _mlp_candidates(40)
    with pytest.raises(UserError, match=r"layer 0 keeps 33 mlp structures, its minimum.*multiple_of=16"):
        round_per_layer(
            ranked, ranked[:removed], _costs(40), KeptShape(multiple_of=16), {ATTENTION: 0, MLP: 33}
        )


def test_rounding_may_reach_a_minimum_that_is_a_multiple() -> None:
    ranked = _mlp_candidates(40)
    chosen = round_per_layer(
        ranked, ranked[:5], _costs(40), KeptShape(multiple_of=16), {ATTENTION: 0, MLP: 32}
    )
    assert chosen == ranked[:8]  # 35 kept, rounded to 32: the next three lowest-ranked go, no more


def test_a_plan_whose_minimum_is_one_above_a_multiple_is_refused() -> None:
    """The same through the planner: layer 0 is cheap enough to lose everything down to min_channels=33."""
    model = _odd_model(intermediate=40, heads=4, kv_heads=2)
    with pytest.raises(UserError, match="keeps 33 mlp structures, its minimum"):
        plan_global(model, _cheap_layer_0_mlp(40, 2), 0.03, min_channels=33, shape=KeptShape(multiple_of=16))


def test_only_the_default_shape_is_free() -> None:
    """A free shape is one that constrains nothing: the planner skips rounding and records no shape."""
    assert KeptShape().is_free
    for shape in (KeptShape(uniform=True), KeptShape(multiple_of=2), KeptShape(heads_multiple_of=2)):
        assert not shape.is_free, shape


@pytest.mark.parametrize(("minimum", "refused"), [(0, False), (1, True)])
def test_rounding_empties_a_block_left_with_one_structure(minimum: int, refused: bool) -> None:
    """One channel of 40 kept is no multiple of 16; the next allowed count is 0, an emptied block: the
    last channel goes too when the minimum allows it, and a minimum of 1 is refused, not left standing."""
    ranked = _mlp_candidates(40)
    args = (ranked, ranked[:39], _costs(40), KeptShape(multiple_of=16), {ATTENTION: 0, MLP: minimum})
    if refused:
        with pytest.raises(UserError, match="layer 0 keeps 1 mlp structures, its minimum"):
            round_per_layer(*args)
    else:
        assert round_per_layer(*args) == ranked


def _one_layer_of_two_groups_and_8_channels() -> tuple[list[Candidate], list[LayerCosts]]:
    """One layer: 2 KV groups of 10 parameters, 8 channels of 1; ranked groups first, then channels."""
    costs = [LayerCosts(LayerGeometry(4, 2, 16, 8), kv_group_cost=10, channel_cost=1)]
    groups = [Candidate(float(g), 0, ATTENTION, g, 10) for g in range(2)]
    return groups + [Candidate(10.0 + j, 0, MLP, j, 1) for j in range(8)], costs


def _removed(chosen: list[Candidate]) -> tuple[int, int]:
    return sum(c.kind == ATTENTION for c in chosen), sum(c.kind == MLP for c in chosen)


@pytest.mark.parametrize("target", [5.0, 10.0])
def test_uniform_takes_no_channel_when_the_groups_reach_the_target(target: float) -> None:
    """The free selection took one of two groups, so every layer loses one (min_kv_groups=0 still keeps
    one: a uniform plan never empties attention); that group alone reaches a target of up to 10, so no
    channel goes. A one-layer model works, and the default ``stock_accepts`` takes every count."""
    ranked, costs = _one_layer_of_two_groups_and_8_channels()
    chosen = select_uniform(ranked, ranked[:1], costs, target, KeptShape(uniform=True), 0, 0)
    assert chosen == ranked[:1]


@pytest.mark.parametrize(
    ("target", "min_channels", "removed"),
    [
        (7.0, 0, (0, 7)),  # 1 channel kept: allowed, a uniform MLP keeps at least one
        (7.0, 1, (0, 7)),  # exactly the minimum is allowed
        (5.0, 3, (0, 5)),
        (7.0, 3, (1, 0)),  # 1 channel would go below the minimum: a group goes instead
        (8.0, 0, (1, 0)),  # 0 channels would empty the MLP: a group goes instead
    ],
)
def test_uniform_keeps_at_least_min_channels_and_never_empties_the_mlp(
    target: float, min_channels: int, removed: tuple[int, int]
) -> None:
    """No group was taken by the free selection, so channels alone make up the target while they can;
    when the kept channels would fall below ``max(min_channels, 1)`` one group goes instead."""
    ranked, costs = _one_layer_of_two_groups_and_8_channels()
    chosen = select_uniform(ranked, [], costs, target, KeptShape(uniform=True), 0, min_channels)
    assert _removed(chosen) == removed


def test_uniform_refuses_a_target_no_kept_count_reaches() -> None:
    """Both groups kept (min_kv_groups=2) and 8 channels of 1: a target of 9 cannot be reached."""
    ranked, costs = _one_layer_of_two_groups_and_8_channels()
    with pytest.raises(UserError, match="no count of KV groups and channels kept in every layer"):
        select_uniform(ranked, [], costs, 9.0, KeptShape(uniform=True), 2, 0)


def test_uniform_refuses_a_head_multiple_no_group_count_meets() -> None:
    """Two query heads per group: 2 or 4 kept query heads, never a multiple of 3."""
    ranked, costs = _one_layer_of_two_groups_and_8_channels()
    with pytest.raises(UserError, match="no kept count of 2 KV groups .of 2 query heads each."):
        select_uniform(ranked, [], costs, 1.0, KeptShape(uniform=True, heads_multiple_of=3), 0, 0)
