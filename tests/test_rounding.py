"""Uniform plans and kept counts in multiples (pruning.planning.rounding) on the planner's tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.errors import UserError
from pruning.families import ATTENTION, MLP, adapter_for
from pruning.families.base import LayerCosts, LayerGeometry
from pruning.planning.planner import Candidate, plan_global
from pruning.planning.rounding import KeptShape, block_chunks, select_aligned, select_uniform
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
@pytest.mark.parametrize("ratio", [0.2, 0.33])
def test_multiple_of_keeps_multiples_and_the_ratio(
    model: LlamaForCausalLM, multiple: int, ratio: float
) -> None:
    """Every layer keeps a multiple of channels, each its lowest-ranked gone, and the plan removes the
    target to within half a chunk (``multiple`` channels), on either side: rounding does not lose the
    ratio."""
    scores = random_scores(6)
    plan = plan_global(model, scores, ratio, shape=KeptShape(multiple_of=multiple))
    target = ratio * plan.params_before
    removed = plan.params_before - plan.params_planned
    layer_costs = adapter_for(model.config).costs(model.model.layers[0], model.config.head_dim)
    largest_chunk = max(multiple * layer_costs.channel_cost, layer_costs.kv_group_cost)
    assert abs(removed - target) <= largest_chunk / 2, (removed, target)
    assert plan.extra["removed_ratio"] == pytest.approx(removed / plan.params_before, abs=1e-6)
    for lp in plan.layers:
        assert len(lp.keep_channels) % multiple == 0
        values = scores.mlp[lp.layer_idx]
        if lp.remove_channels and lp.keep_channels:
            assert values[list(lp.remove_channels)].max() <= values[list(lp.keep_channels)].min()


def test_rounding_goes_both_ways() -> None:
    """Two blocks of 40 channels (multiple_of 16: chunks of 8, then 16 and 16), only block 0 cheap. A
    target of 20 is nearer 24 (8 + 16) than 8, and one of 14 nearer 8 than 24: the plan stops at the
    nearer boundary, past the target or short of it."""
    costs = _costs(40) * 2
    ranked = [Candidate(float(i), 0, MLP, i, 1) for i in range(40)]
    ranked += [Candidate(100.0 + i, 1, MLP, i, 1) for i in range(40)]
    minimum = {ATTENTION: 0, MLP: 0}
    assert select_aligned(ranked, costs, 20, set(), minimum, KeptShape(multiple_of=16)) == ranked[:24]
    assert select_aligned(ranked, costs, 14, set(), minimum, KeptShape(multiple_of=16)) == ranked[:8]
    assert select_aligned(ranked, costs, 15.9, set(), minimum, KeptShape(multiple_of=16)) == ranked[:8]
    assert select_aligned(ranked, costs, 16.1, set(), minimum, KeptShape(multiple_of=16)) == ranked[:24]


def test_the_ranking_picks_chunks_by_their_mean_value() -> None:
    """Block 1's first chunk (8 channels) holds its cheapest channel of all, but its mean is above block
    0's first chunk: block 0's chunk goes first. Protected layers give no chunk."""
    costs = _costs(40) * 2
    ranked = sorted(
        [Candidate(10.0 + i, 0, MLP, i, 1) for i in range(40)]
        + [Candidate(0.0 if i == 0 else 50.0 + i, 1, MLP, i, 1) for i in range(40)],
        key=lambda c: c.value,
    )
    chosen = select_aligned(ranked, costs, 8, set(), {ATTENTION: 0, MLP: 0}, KeptShape(multiple_of=16))
    assert {(c.layer_idx, c.index) for c in chosen} == {(0, i) for i in range(8)}
    chosen = select_aligned(ranked, costs, 8, {0}, {ATTENTION: 0, MLP: 0}, KeptShape(multiple_of=16))
    assert {c.layer_idx for c in chosen} == {1} and len(chosen) == 8


def test_block_chunks_leave_allowed_counts_and_respect_the_minimum() -> None:
    ranked = _mlp_candidates(40)
    sizes = [len(c.members) for c in block_chunks(ranked, 40, 16, 0, block_cost=5)]
    assert sizes == [8, 16, 16]
    chunks = block_chunks(ranked, 40, 16, 0, block_cost=5)
    assert [c.cost for c in chunks] == [8, 16, 16 + 5]  # the last one empties the block
    assert chunks[0].value == pytest.approx(3.5)
    assert [len(c.members) for c in block_chunks(ranked, 40, 16, 17, 5)] == [8]  # never below 32
    assert [len(c.members) for c in block_chunks(ranked, 40, 16, 1, 5)] == [8, 16]
    assert block_chunks(ranked, 40, 16, 33, 5) == []  # 48, the first multiple >= 33, is above 40
    assert [len(c.members) for c in block_chunks(_mlp_candidates(48), 48, 16, 0, 5)] == [16, 16, 16]


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
    with pytest.raises(UserError, match=r"minimums.*short of the target"):
        plan_global(model, scores, 0.06, min_kv_groups=2, min_channels=30, shape=KeptShape(multiple_of=16))


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
    assert groups_0 == 3 and channels_0 % 16 == 0 and abs(channels_0 - kept(free)[0][1]) < 16


def _mlp_candidates(channels: int) -> list[Candidate]:
    return [Candidate(float(i), 0, MLP, i, 1) for i in range(channels)]


def _costs(channels: int) -> list[LayerCosts]:
    return [LayerCosts(LayerGeometry(4, 2, 16, channels), kv_group_cost=10, channel_cost=1)]


def test_rounding_never_goes_below_a_minimum_that_is_no_multiple() -> None:
    """40 channels, minimum 33, multiple_of 16: the next allowed count at or above 33 is 48, so the
    block cannot lose anything, and a target only it could reach is refused, not silently undercut."""
    ranked = _mlp_candidates(40)
    with pytest.raises(UserError, match=r"multiple_of=16.*short of the target 5"):
        select_aligned(ranked, _costs(40), 5, set(), {ATTENTION: 1, MLP: 33}, KeptShape(multiple_of=16))


def test_rounding_may_reach_a_minimum_that_is_a_multiple() -> None:
    ranked = _mlp_candidates(40)
    chosen = select_aligned(ranked, _costs(40), 5, set(), {ATTENTION: 1, MLP: 32}, KeptShape(multiple_of=16))
    assert chosen == ranked[:8]  # 40 kept, then 32: the eight lowest-ranked go, no more


def test_a_plan_whose_minimum_is_no_multiple_keeps_the_next_multiple_above_it() -> None:
    """Through the planner: layer 0 is cheap, min_channels=17 with multiple_of 16 keeps at least 32."""
    model = _odd_model(intermediate=40, heads=4, kv_heads=2)
    plan = plan_global(
        model, _cheap_layer_0_mlp(40, 2), 0.05, min_channels=17, shape=KeptShape(multiple_of=16)
    )
    assert len(plan.layers[0].keep_channels) == 32 and len(plan.layers[1].keep_channels) in (40, 32, 16)


def test_only_the_default_shape_is_free() -> None:
    """A free shape is one that constrains nothing: the planner skips rounding and records no shape."""
    assert KeptShape().is_free
    for shape in (KeptShape(uniform=True), KeptShape(multiple_of=2), KeptShape(heads_multiple_of=2)):
        assert not shape.is_free, shape


@pytest.mark.parametrize(("minimum", "refused"), [(0, False), (1, True)])
def test_rounding_may_empty_a_block_only_when_the_minimum_allows(minimum: int, refused: bool) -> None:
    """A target of 39 of 40 channels (multiple_of 16): the nearest boundary is the emptied block (40
    and its own cost), taken when the minimum is 0; with a minimum of 1 the block keeps 16 at least,
    so 24 is the most it can lose and the target is refused."""
    ranked = _mlp_candidates(40)
    args = (ranked, _costs(40), 39, set(), {ATTENTION: 0, MLP: minimum}, KeptShape(multiple_of=16))
    if refused:
        with pytest.raises(UserError, match="at most 24 parameters can go"):
            select_aligned(*args)
    else:
        assert select_aligned(*args) == ranked


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
