"""Global planner on a tiny Llama with hand-made scores: ranking, target accounting, constraints."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.criteria.activation import ActivationCriterion
from pruning.errors import UserError
from pruning.families import ATTENTION, MLP, adapter_for
from pruning.families.base import LayerCosts, LayerGeometry
from pruning.planning.plan import PruningPlan
from pruning.planning.planner import (
    Candidate,
    _stock_config_accepts,
    normalized_candidates,
    plan_global,
    removable_cost,
    select_for_removal,
)
from pruning.planning.rounding import KeptShape
from pruning.planning.scores import StructureScores
from tests.tiny_models import ARCHS

HD, G, K, C, HIDDEN, LAYERS = 16, 2, 2, 128, 64, 3


def tiny_model(layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=C,
        num_attention_heads=G * K,
        num_key_value_heads=K,
        num_hidden_layers=layers,
        vocab_size=128,
        head_dim=HD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def random_scores(seed: int = 0, layers: int = LAYERS) -> StructureScores:
    gen = torch.Generator().manual_seed(seed)
    return StructureScores(
        attention=[torch.rand(K, generator=gen) * 1000 + 1 for _ in range(layers)],
        mlp=[torch.rand(C, generator=gen) * 10 + 0.1 for _ in range(layers)],
    )


def physical_param_count(model: LlamaForCausalLM, plan: PruningPlan) -> int:
    """Parameters left after slicing out the planned rows/columns of every projection."""
    total = 0
    layer_linear_ids = set()
    for lp, layer in zip(plan.layers, model.model.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        q_rows = [h * HD + d for g in lp.keep_kv_groups for h in range(g * G, (g + 1) * G) for d in range(HD)]
        kv_rows = [g * HD + d for g in lp.keep_kv_groups for d in range(HD)]
        ch = list(lp.keep_channels)
        total += attn.q_proj.weight[q_rows].numel() + attn.k_proj.weight[kv_rows].numel()
        total += attn.v_proj.weight[kv_rows].numel() + attn.o_proj.weight[:, q_rows].numel()
        total += mlp.gate_proj.weight[ch].numel() + mlp.up_proj.weight[ch].numel()
        total += mlp.down_proj.weight[:, ch].numel()
        # The norm feeding an emptied block goes with it (surgery replaces it by Identity).
        total -= layer.input_layernorm.weight.numel() if lp.attention_removed else 0
        total -= layer.post_attention_layernorm.weight.numel() if lp.mlp_removed else 0
        for lin in (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ):
            layer_linear_ids.update(id(p) for p in lin.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in layer_linear_ids)


def values(model: LlamaForCausalLM, scores: StructureScores) -> dict[tuple[int, str, int], float]:
    """Per-parameter importance divided by its type's median: the spec's common scale."""
    costs = [adapter_for(model.config).costs(layer, HD) for layer in model.model.layers]
    attn = [s / c.kv_group_cost for s, c in zip(scores.attention, costs, strict=True)]
    mlp = [s / c.channel_cost for s, c in zip(scores.mlp, costs, strict=True)]
    attn_med, mlp_med = torch.cat(attn).double().median(), torch.cat(mlp).double().median()
    out = {}
    for i in range(LAYERS):
        out.update({(i, "attention", g): float(attn[i][g] / attn_med) for g in range(K)})
        out.update({(i, "mlp", j): float(mlp[i][j] / mlp_med) for j in range(C)})
    return out


def removed_keys(plan: PruningPlan) -> set[tuple[int, str, int]]:
    keys = {(lp.layer_idx, "attention", g) for lp in plan.layers for g in lp.remove_kv_groups}
    return keys | {(lp.layer_idx, "mlp", j) for lp in plan.layers for j in lp.remove_channels}


def cost_of(key: tuple[int, str, int]) -> int:
    return (G * HD + 2 * HD) * HIDDEN + G * HD * HIDDEN if key[1] == "attention" else 3 * HIDDEN


def test_costs_follow_module_shapes(model: LlamaForCausalLM) -> None:
    lc = adapter_for(model.config).costs(model.model.layers[0], HD)
    assert (lc.num_kv_groups, lc.num_channels) == (K, C)
    assert lc.kv_group_cost == (G * HD + 2 * HD) * HIDDEN + G * HD * HIDDEN == 6144
    assert lc.channel_cost == 3 * HIDDEN


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4])
def test_removes_lowest_ranked_and_lands_within_one_structure(model: LlamaForCausalLM, ratio: float) -> None:
    scores = random_scores()
    plan = plan_global(model, scores, ratio, criterion="test")
    before = sum(p.numel() for p in model.parameters())
    target = ratio * before
    removed = removed_keys(plan)
    vals = values(model, scores)
    kept = set(vals) - removed
    assert max(vals[k] for k in removed) <= min(vals[k] for k in kept)  # a prefix of the global ranking
    emptied = len(plan.extra["attention_blocks_removed"]) + len(plan.extra["mlp_blocks_removed"])
    removed_cost = sum(cost_of(k) for k in removed) + HIDDEN * emptied  # an emptied block's norm goes too
    last = max(removed, key=lambda k: (vals[k], k))  # ties go by (layer, kind, index), as in the planner
    assert removed_cost >= target > removed_cost - cost_of(last)  # stops at the first that reaches it
    assert plan.params_before == before
    assert plan.params_target == before - round(target)
    assert plan.params_planned == before - removed_cost == physical_param_count(model, plan)
    assert plan.criterion == "test"
    assert plan.extra["removed_kv_groups"] == sum(len(lp.remove_kv_groups) for lp in plan.layers)
    assert plan.extra["removed_channels"] == sum(len(lp.remove_channels) for lp in plan.layers)


def test_attention_and_mlp_compete_on_one_scale(model: LlamaForCausalLM) -> None:
    """Rescaling one type's scores by any factor leaves the plan unchanged (median normalisation)."""
    scores = random_scores(seed=3)
    rescaled = StructureScores(
        attention=[s * 1e4 for s in scores.attention], mlp=[s * 1e-3 for s in scores.mlp]
    )
    a, b = plan_global(model, scores, 0.3), plan_global(model, rescaled, 0.3)
    assert a.layers == b.layers
    assert a.extra["removed_kv_groups"] > 0 and a.extra["removed_channels"] > 0


def test_common_scale_scores_are_ranked_as_given(model: LlamaForCausalLM) -> None:
    """A criterion that already shares one scale is not renormalised: boosting MLP keeps all channels."""
    scores = random_scores(seed=3)
    boosted = StructureScores(
        attention=list(scores.attention), mlp=[s * 1e6 for s in scores.mlp], common_scale=True
    )
    plan = plan_global(model, boosted, 0.05)
    assert plan.extra["removed_channels"] == 0 and plan.extra["removed_kv_groups"] > 0


def test_can_remove_a_whole_attention_block(model: LlamaForCausalLM) -> None:
    scores = random_scores()
    scores.attention[1] = torch.full((K,), 1e-6)
    plan = plan_global(model, scores, 0.15)
    assert plan.layers[1].attention_removed
    assert plan.extra["attention_blocks_removed"] == [1]
    assert plan.params_planned == physical_param_count(model, plan)


def test_protected_layers_lose_nothing(model: LlamaForCausalLM) -> None:
    scores = random_scores()
    scores.attention[1] = torch.full((K,), 1e-6)
    scores.mlp[1] = torch.full((C,), 1e-6)
    plan = plan_global(model, scores, 0.3, protected_layers=[1])
    assert plan.layers[1].is_empty
    assert plan.params_planned <= plan.params_target
    unprotected = plan_global(model, scores, 0.3)
    assert not unprotected.layers[1].is_empty


def test_minimums_are_kept_per_layer(model: LlamaForCausalLM) -> None:
    scores = random_scores()
    scores.attention[0] = torch.full((K,), 1e-6)
    scores.mlp[2] = torch.full((C,), 1e-6)
    plan = plan_global(model, scores, 0.5, min_kv_groups=1, min_channels=40)
    for lp in plan.layers:
        assert len(lp.keep_kv_groups) >= 1 and len(lp.keep_channels) >= 40
    assert len(plan.layers[0].keep_kv_groups) == 1 and len(plan.layers[2].keep_channels) == 40
    assert plan.params_planned <= plan.params_target


def test_ratio_of_layers_differs_from_total(model: LlamaForCausalLM) -> None:
    scores = random_scores()
    total = plan_global(model, scores, 0.2, ratio_of="total")
    layers = plan_global(model, scores, 0.2, ratio_of="layers")
    before = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    assert total.params_target == before - round(0.2 * before)
    assert layers.params_target == before - round(0.2 * layer_params)
    assert layers.params_planned > total.params_planned  # fewer removed: smaller base
    assert layers.extra["ratio_of"] == "layers"


def test_unreachable_target_is_a_user_error_with_reachable_ratio(model: LlamaForCausalLM) -> None:
    with pytest.raises(UserError, match=r"reachable ratio is 0\.00%"):
        plan_global(model, random_scores(), 0.1, protected_layers=[0, 1, 2])
    with pytest.raises(UserError, match="reachable ratio"):
        plan_global(model, random_scores(), 0.6, min_kv_groups=1, min_channels=64)
    # Minimums at the full size leave nothing removable, however small the target.
    with pytest.raises(UserError, match=r"reachable ratio is 0\.00% \(0 parameters\)"):
        plan_global(model, random_scores(), 0.001, min_kv_groups=K, min_channels=C)


def test_removable_cost_counts_only_what_the_minimums_leave(model: LlamaForCausalLM) -> None:
    """A minimum at or above a layer's count leaves none of that kind removable (not a negative count,
    not one structure); protected layers count for nothing."""
    costs = [adapter_for(model.config).costs(layer, HD) for layer in model.model.layers]
    group, channel = cost_of((0, "attention", 0)), cost_of((0, "mlp", 0))
    assert removable_cost(costs, set(), 0, 0) == LAYERS * (K * group + C * channel)
    assert removable_cost(costs, set(), K, 0) == LAYERS * C * channel
    assert removable_cost(costs, set(), 0, C) == LAYERS * K * group
    assert removable_cost(costs, set(), K + 1, C + 5) == 0
    assert removable_cost(costs, {0, 2}, 1, 100) == group + 28 * channel


def test_a_target_of_exactly_the_reachable_cost_is_planned(model: LlamaForCausalLM) -> None:
    """Reachable means reachable: a target equal to what the constraints allow is no error, whether it is
    nothing (ratio 0, every layer protected) or every removable channel."""
    plan = plan_global(model, random_scores(), 0.0, protected_layers=[0, 1, 2])
    assert all(lp.is_empty for lp in plan.layers)
    costs = [adapter_for(model.config).costs(layer, HD) for layer in model.model.layers]
    reachable = removable_cost(costs, set(), K, 0)
    before = sum(p.numel() for p in model.parameters())
    ratio = reachable / before
    assert ratio * before == reachable  # the target is exactly the reachable cost
    plan = plan_global(model, random_scores(), ratio, min_kv_groups=K)
    assert plan.extra["removed_kv_groups"] == 0
    assert plan.params_planned <= plan.params_target


def test_zero_ratio_plans_nothing(model: LlamaForCausalLM) -> None:
    plan = plan_global(model, random_scores(), 0.0)
    assert all(lp.is_empty for lp in plan.layers)
    assert plan.params_planned == plan.params_target == plan.params_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 1.5}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.2, "ratio_of": "all"}, "ratio_of must be one of"),
        ({"ratio": 0.2, "protected_layers": [3]}, r"protected_layers \[3\] out of range"),
        ({"ratio": 0.2, "min_kv_groups": -1}, "must be >= 0"),
        ({"ratio": 0.2, "min_channels": -1}, "must be >= 0"),
    ],
)
def test_bad_arguments_are_user_errors(model: LlamaForCausalLM, kwargs: dict, message: str) -> None:
    """Each argument is refused by its own check, with its own message: a ratio of 1 would otherwise be
    refused only later, as an unreachable target, and a negative minimum would be planned with."""
    with pytest.raises(UserError, match=message):
        plan_global(model, random_scores(), **kwargs)


def test_end_to_end_with_activation_scores(model: LlamaForCausalLM) -> None:
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = ActivationCriterion(batch_size=2).score(model, windows)
    plan = plan_global(model, scores, 0.25, criterion="activation")
    assert plan.params_planned == physical_param_count(model, plan)
    assert plan.params_planned <= plan.params_target
    assert PruningPlan.from_dict(plan.to_dict()) == plan


def _blocks_emptying_scores(model, seed: int) -> StructureScores:
    """Random scores, with layer 1's attention and layer 3's MLP made cheapest, so plans empty blocks."""
    gen = torch.Generator().manual_seed(seed)
    adapter = adapter_for(model.config)
    geos = [
        adapter.geometry(layer, adapter.head_dim(model.config)) for layer in adapter.decoder_layers(model)
    ]
    attention = [
        torch.rand(g.num_kv_heads, generator=gen) + (0.0 if i == 1 else 1.0) for i, g in enumerate(geos)
    ]
    mlp = [
        torch.rand(g.intermediate_size, generator=gen) + (0.0 if i == 3 else 1.0) for i, g in enumerate(geos)
    ]
    return StructureScores(attention=attention, mlp=mlp, common_scale=True)


@pytest.mark.parametrize("ratio", [0.1, 0.35, 0.6])
@pytest.mark.parametrize("arch", ARCHS)
def test_planned_size_is_the_size_after_surgery(arch: str, ratio: float):
    """For every family, biases and per-head norms included, the plan's size is the pruned model's
    size: an emptied block also frees its output bias, q/k norms and the norms that served it."""
    from pruning.surgery import apply_plan
    from tests.tiny_models import tiny_model as family_model

    model = family_model(arch)
    plan = plan_global(model, _blocks_emptying_scores(model, seed=int(ratio * 100)), ratio)
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params_planned
    if ratio >= 0.35:
        assert plan.layers[1].attention_removed or plan.layers[3].mlp_removed


def test_rounding_far_past_the_target_is_a_warning(model: LlamaForCausalLM, caplog) -> None:
    """Finding 13: multiple_of above the MLP size removes whole MLPs, far from what was asked, silently."""
    from pruning.planning.rounding import KeptShape

    plan = plan_global(model, random_scores(), 0.2, criterion="test", shape=KeptShape(multiple_of=2 * C))
    removed = plan.params_before - plan.params_planned
    assert removed > 1.4 * (plan.params_before - plan.params_target)  # the case is real
    assert "more than the target" in caplog.text and "multiple_of" in caplog.text
    caplog.clear()
    plan_global(model, random_scores(), 0.2, criterion="test", shape=KeptShape(multiple_of=2))
    assert "more than the target" not in caplog.text  # a rounding of a few channels says nothing
    plan = plan_global(model, random_scores(), 0.15, criterion="test", shape=KeptShape(multiple_of=2 * C))
    assert plan.params_before - plan.params_planned < 0.7 * (plan.params_before - plan.params_target)
    assert "35% less than the target" in caplog.text  # the nearer boundary may be far short of it too


def layer_costs(
    groups: int, channels: int, group_cost: int = 100, channel_cost: int = 10, attention_block: int = 0
) -> LayerCosts:
    """Hand-made costs, so layers can differ and an emptied block can cost something noticeable."""
    return LayerCosts(
        LayerGeometry(num_heads=groups * G, num_kv_heads=groups, head_dim=HD, intermediate_size=channels),
        kv_group_cost=group_cost,
        channel_cost=channel_cost,
        attention_block_cost=attention_block,
    )


def by_structure(candidates: list[Candidate]) -> dict[tuple[int, str, int], tuple[float, int]]:
    return {(c.layer_idx, c.kind, c.index): (c.value, c.cost) for c in candidates}


def test_values_are_score_per_parameter_over_the_type_median() -> None:
    """Layers of different sizes: each score is divided by its own layer's cost per structure, then by its
    type's median; scores that share one scale already are only divided by the cost."""
    costs = [
        layer_costs(1, 2, group_cost=100, channel_cost=10),
        layer_costs(2, 1, group_cost=200, channel_cost=30),
    ]
    attention = [torch.tensor([100.0]), torch.tensor([400.0, 1000.0])]  # per parameter 1 | 2, 5
    mlp = [torch.tensor([10.0, 40.0]), torch.tensor([60.0])]  # per parameter 1, 4 | 2
    got = by_structure(normalized_candidates(StructureScores(attention, mlp), costs))
    assert got == {
        (0, ATTENTION, 0): (pytest.approx(0.5), 100),
        (1, ATTENTION, 0): (pytest.approx(1.0), 200),
        (1, ATTENTION, 1): (pytest.approx(2.5), 200),
        (0, MLP, 0): (pytest.approx(0.5), 10),
        (0, MLP, 1): (pytest.approx(2.0), 10),
        (1, MLP, 0): (pytest.approx(1.0), 30),
    }
    common = by_structure(normalized_candidates(StructureScores(attention, mlp, common_scale=True), costs))
    assert {k: v for k, (v, _) in common.items()} == {
        (0, ATTENTION, 0): pytest.approx(1.0),
        (1, ATTENTION, 0): pytest.approx(2.0),
        (1, ATTENTION, 1): pytest.approx(5.0),
        (0, MLP, 0): pytest.approx(1.0),
        (0, MLP, 1): pytest.approx(4.0),
        (1, MLP, 0): pytest.approx(2.0),
    }


def test_type_scale_falls_back_to_the_mean_then_to_one() -> None:
    """A median of 0 (most scores exactly zero) divides by the mean instead, whatever its size; a type
    with no positive mean (all zero, or negative scores) is left as score / cost rather than divided by
    0 or flipped in sign."""
    costs = [layer_costs(1, 2), layer_costs(2, 1)]
    mostly_zero = [torch.tensor([0.0]), torch.tensor([0.0, 150.0])]  # per parameter 0, 0, 1.5: mean 0.5
    negative = [torch.tensor([-10.0, -40.0]), torch.tensor([-20.0])]  # per parameter -1, -4, -2
    got = by_structure(normalized_candidates(StructureScores(mostly_zero, negative), costs))
    assert [got[k][0] for k in ((0, ATTENTION, 0), (1, ATTENTION, 0), (1, ATTENTION, 1))] == [0.0, 0.0, 3.0]
    assert [got[k][0] for k in ((0, MLP, 0), (0, MLP, 1), (1, MLP, 0))] == [-1.0, -4.0, -2.0]
    zeros = StructureScores([torch.zeros(1), torch.zeros(2)], [torch.zeros(2), torch.zeros(1)])
    assert {v for v, _ in by_structure(normalized_candidates(zeros, costs)).values()} == {0.0}


def test_scores_that_do_not_fit_the_model_are_refused() -> None:
    """A criterion's output for another model (more layers for either kind, or another count in one
    layer) is refused, not silently truncated or read past."""
    costs = [layer_costs(2, 3), layer_costs(2, 3)]
    attention, mlp = [torch.ones(2), torch.ones(2)], [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match="scores cover 3/2 layers, the model has 2"):
        normalized_candidates(StructureScores([*attention, torch.ones(2)], mlp), costs)
    with pytest.raises(ValueError, match="scores cover 2/3 layers, the model has 2"):
        normalized_candidates(StructureScores(attention, [*mlp, torch.ones(3)]), costs)
    with pytest.raises(ValueError, match="layer 1: 3 attention scores for 2 structures"):
        normalized_candidates(StructureScores([torch.ones(2), torch.ones(3)], mlp), costs)
    with pytest.raises(ValueError, match="layer 0: 2 mlp scores for 3 structures"):
        normalized_candidates(StructureScores(attention, [torch.ones(2), torch.ones(3)]), costs)


def test_a_kind_gone_from_every_layer_gives_no_candidates() -> None:
    """A model pruned before, with attention removed everywhere: only its channels are candidates."""
    costs = [layer_costs(0, 2), layer_costs(0, 1)]
    scores = StructureScores([torch.ones(0), torch.ones(0)], [torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    got = normalized_candidates(scores, costs)
    assert sorted((c.layer_idx, c.kind, c.index) for c in got) == [(0, MLP, 0), (0, MLP, 1), (1, MLP, 0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_a_user_error(model: LlamaForCausalLM, bad: float) -> None:
    """One overflowed score among finite ones would make the ranking meaningless: it is refused."""
    scores = random_scores()
    scores.mlp[1][5] = bad
    with pytest.raises(UserError, match="mlp scores contain NaN or infinity"):
        plan_global(model, scores, 0.2)


def channels(layer_cost: LayerCosts) -> list[Candidate]:
    return [Candidate(float(j), 0, MLP, j, layer_cost.channel_cost) for j in range(layer_cost.num_channels)]


@pytest.mark.parametrize(("target", "count"), [(0.0, 0), (0.5, 1), (20.0, 2), (20.5, 3), (40.0, 4)])
def test_selection_stops_at_the_first_structure_that_reaches_the_target(target: float, count: int) -> None:
    """Channels of 10 parameters each: a target of exactly 20 takes two, 20.5 takes three, any positive
    target at least one, a target of 0 none."""
    costs = [layer_costs(1, 4)]
    ranked = channels(costs[0])
    assert select_for_removal(ranked, costs, target, set(), 0, 0) == ranked[:count]


def test_emptying_a_block_counts_its_block_cost_once() -> None:
    """The block cost (norm, bias) is freed with a block's last structure, not its second to last: with a
    block cost of 1000, removing both groups (100 each) reaches a target of 150 and no more is taken."""
    costs = [layer_costs(2, 4, attention_block=1000)]
    groups = [Candidate(-1.0 + g, 0, ATTENTION, g, 100) for g in range(2)]
    ranked = groups + channels(costs[0])
    assert select_for_removal(ranked, costs, 150.0, set(), 0, 0) == groups
    # The whole block is worth 1200: a target of 1190 is reached by the two groups alone.
    assert select_for_removal(ranked, costs, 1190.0, set(), 0, 0) == groups


def test_uniform_shape_is_recorded_and_refuses_protected_layers(model: LlamaForCausalLM) -> None:
    """A uniform plan records its shape in ``extra`` (a free plan records none), works on a one-layer
    model, and cannot keep a protected layer whole."""
    one_layer = tiny_model(layers=1)
    uniform = KeptShape(uniform=True)
    plan = plan_global(one_layer, random_scores(layers=1), 0.1, shape=uniform)
    assert plan.extra["shape"] == asdict(uniform)
    assert plan.params_planned <= plan.params_target
    assert "shape" not in plan_global(one_layer, random_scores(layers=1), 0.1).extra
    rounded = KeptShape(multiple_of=8)
    assert plan_global(model, random_scores(), 0.1, shape=rounded).extra["shape"] == asdict(rounded)
    with pytest.raises(UserError, match="cannot keep protected_layers whole"):
        plan_global(model, random_scores(), 0.1, protected_layers=[1], shape=uniform)


def test_stock_config_accepts_only_what_its_config_class_takes() -> None:
    """With 2 query heads per KV group and hidden size 90, LlamaConfig takes 2, 6 and 10 query heads (1, 3
    and 5 groups) and refuses 4 and 8, which do not divide 90."""
    config = LlamaConfig(hidden_size=90, num_attention_heads=10, num_key_value_heads=5, head_dim=16)
    assert [k for k in range(1, 6) if _stock_config_accepts(config, 2, 16, k)] == [1, 3, 5]
