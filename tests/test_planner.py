"""Global planner on a tiny Llama with hand-made scores: ranking, target accounting, constraints."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.criteria.activation import ActivationCriterion
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.planning.plan import PruningPlan
from pruning.planning.planner import plan_global
from pruning.planning.scores import StructureScores
from tests.tiny_models import ARCHS

HD, G, K, C, HIDDEN, LAYERS = 16, 2, 2, 128, 64, 3


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=C,
        num_attention_heads=G * K,
        num_key_value_heads=K,
        num_hidden_layers=LAYERS,
        vocab_size=128,
        head_dim=HD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def random_scores(seed: int = 0) -> StructureScores:
    gen = torch.Generator().manual_seed(seed)
    return StructureScores(
        attention=[torch.rand(K, generator=gen) * 1000 + 1 for _ in range(LAYERS)],
        mlp=[torch.rand(C, generator=gen) * 10 + 0.1 for _ in range(LAYERS)],
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


def test_zero_ratio_plans_nothing(model: LlamaForCausalLM) -> None:
    plan = plan_global(model, random_scores(), 0.0)
    assert all(lp.is_empty for lp in plan.layers)
    assert plan.params_planned == plan.params_target == plan.params_before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": 1.0},
        {"ratio": -0.1},
        {"ratio": 0.2, "ratio_of": "all"},
        {"ratio": 0.2, "protected_layers": [3]},
    ],
)
def test_bad_arguments_are_user_errors(model: LlamaForCausalLM, kwargs: dict) -> None:
    with pytest.raises(UserError):
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
    """Finding 13: multiple_of above the MLP size removes whole MLPs, far more than asked, silently."""
    from pruning.planning.rounding import KeptShape

    plan = plan_global(model, random_scores(), 0.2, criterion="test", shape=KeptShape(multiple_of=2 * C))
    removed = plan.params_before - plan.params_planned
    assert removed > 1.5 * (plan.params_before - plan.params_target)  # the case is real
    assert "more than the target" in caplog.text and "multiple_of" in caplog.text
    caplog.clear()
    plan_global(model, random_scores(), 0.2, criterion="test", shape=KeptShape(multiple_of=2))
    assert "more than the target" not in caplog.text  # a rounding of a few channels says nothing
