"""Importance criteria against hand computations on tiny random Llama models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.criteria.activation import ActivationCriterion
from pruning.criteria.magnitude import MagnitudeCriterion
from pruning.criteria.registry import CRITERIA, get_criterion
from pruning.criteria.taylor import TaylorCriterion
from pruning.errors import UserError
from tests.tiny_models import ARCHS

HD, G, K, C = 16, 2, 2, 128  # head_dim, query heads per KV head, KV groups, MLP channels


def tiny_model(bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=C,
        num_attention_heads=G * K,
        num_key_value_heads=K,
        num_hidden_layers=3,
        vocab_size=128,
        head_dim=HD,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = LlamaForCausalLM(config).eval()
    if bias:  # transformers initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return model


def random_windows(n: int = 4, seq_len: int = 12, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def group_sums(imp: dict[str, torch.Tensor], bias: dict[str, torch.Tensor]) -> torch.Tensor:
    """KV group scores by explicit row/column indexing (independent of the code's reshapes)."""
    out = []
    for g in range(K):
        q_rows = slice(g * G * HD, (g + 1) * G * HD)
        kv_rows = slice(g * HD, (g + 1) * HD)
        total = imp["q_proj"][q_rows].sum() + imp["k_proj"][kv_rows].sum() + imp["v_proj"][kv_rows].sum()
        total = total + imp["o_proj"][:, q_rows].sum()
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if name in bias:
                total = total + bias[name][rows].sum()
        out.append(total)
    return torch.stack(out)


def channel_sums(imp: dict[str, torch.Tensor], bias: dict[str, torch.Tensor]) -> torch.Tensor:
    out = []
    for j in range(C):
        total = imp["gate_proj"][j].sum() + imp["up_proj"][j].sum() + imp["down_proj"][:, j].sum()
        for name in ("gate_proj", "up_proj"):
            if name in bias:
                total = total + bias[name][j]
        out.append(total)
    return torch.stack(out)


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "q_proj": attn.q_proj,
        "k_proj": attn.k_proj,
        "v_proj": attn.v_proj,
        "o_proj": attn.o_proj,
        "gate_proj": mlp.gate_proj,
        "up_proj": mlp.up_proj,
        "down_proj": mlp.down_proj,
    }


def test_magnitude_equals_sum_abs_weights_and_biases() -> None:
    model = tiny_model(bias=True)
    scores = MagnitudeCriterion().score(model, None)
    assert len(scores.attention) == len(scores.mlp) == 3
    for idx, layer in enumerate(model.model.layers):
        lin = linears(layer)
        imp = {n: m.weight.detach().abs() for n, m in lin.items()}
        bias = {n: m.bias.detach().abs() for n, m in lin.items() if m.bias is not None}
        assert scores.attention[idx].shape == (K,) and scores.mlp[idx].shape == (C,)
        torch.testing.assert_close(scores.attention[idx], group_sums(imp, bias))
        torch.testing.assert_close(scores.mlp[idx], channel_sums(imp, bias))


def test_activation_scores_equal_hand_computation_on_one_layer() -> None:
    """Score = sum over output columns of W^2 * E[x^2], over the layer input's typical energy."""
    model = tiny_model(bias=True)
    windows = random_windows(n=5)
    scores = ActivationCriterion(batch_size=2).score(model, windows)
    assert scores.common_scale

    layer = model.model.layers[1]
    captured: dict[str, torch.Tensor] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0])),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("down", a[0])),
    ]
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states[1]
    for h in handles:
        h.remove()
    per_dim = hidden.reshape(-1, hidden.shape[-1]).pow(2).mean(dim=0)  # E[h_d^2] per residual dimension
    residual = per_dim.median() * per_dim.numel()  # typical energy, robust to a few huge dimensions
    zero_rows = {n: torch.zeros_like(lin.weight) for n, lin in linears(layer).items()}
    imp = dict(zero_rows)
    for name, key in (("o_proj", "o"), ("down_proj", "down")):
        x = captured[key].reshape(-1, captured[key].shape[-1])
        imp[name] = linears(layer)[name].weight.detach().pow(2) * x.pow(2).mean(dim=0) / residual
    torch.testing.assert_close(scores.attention[1], group_sums(imp, {}), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scores.mlp[1], channel_sums(imp, {}), rtol=1e-4, atol=1e-8)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_activation_differs_from_magnitude_and_ignores_batch_size() -> None:
    model = tiny_model()
    windows = random_windows(n=4)
    a1 = ActivationCriterion(batch_size=1).score(model, windows)
    a4 = ActivationCriterion(batch_size=4).score(model, windows)
    mag = MagnitudeCriterion().score(model, windows)
    for i in range(3):
        torch.testing.assert_close(a1.mlp[i], a4.mlp[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a1.attention[i], a4.attention[i], rtol=1e-4, atol=1e-5)
    ratio = a1.mlp[0] / mag.mlp[0]
    assert ratio.std() / ratio.mean() > 0.01  # not a rescaled magnitude


def test_activation_hooks_removed_when_scoring_fails() -> None:
    model = tiny_model()
    with pytest.raises(ValueError):
        ActivationCriterion().score(model, torch.zeros(0, dtype=torch.long))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_taylor_equals_full_batch_gradient_and_restores_state() -> None:
    model = tiny_model(bias=True)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag that must come back as it was
    windows = random_windows(n=3)

    layer = model.model.layers[2]
    loss = model(input_ids=windows, labels=windows, use_cache=False).loss
    loss.backward()
    imp, bias = {}, {}
    for name, lin in linears(layer).items():
        imp[name] = (lin.weight * lin.weight.grad).detach().abs()
        bias[name] = (lin.bias * lin.bias.grad).detach().abs()
    expected_attn, expected_mlp = group_sums(imp, bias), channel_sums(imp, bias)
    model.zero_grad(set_to_none=True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    scores = TaylorCriterion(batch_size=1).score(model, windows)  # 3 mini-batches, accumulated
    torch.testing.assert_close(scores.attention[2], expected_attn, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(scores.mlp[2], expected_mlp, rtol=1e-3, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_taylor_is_nonzero_and_depends_on_data() -> None:
    model = tiny_model()
    s1 = TaylorCriterion(batch_size=2).score(model, random_windows(seed=1))
    s2 = TaylorCriterion(batch_size=2).score(model, random_windows(seed=2))
    for i in range(3):
        assert (s1.attention[i] > 0).all() and (s1.mlp[i] > 0).all()
        assert not torch.allclose(s1.mlp[i], s2.mlp[i])
        assert not torch.allclose(s1.attention[i], s2.attention[i])


def test_removed_blocks_and_pruned_layers_score_with_their_current_shapes() -> None:
    model = tiny_model()
    layers = model.model.layers
    layers[1].self_attn = ZeroAttention(layer_idx=1, head_dim=HD)
    layers[2].mlp = ZeroMLP()
    attn = layers[0].self_attn  # keep KV group 1 only: q rows 32:64, k/v rows 16:32, o columns 32:64
    with torch.no_grad():
        for name, rows in (("q_proj", slice(32, 64)), ("k_proj", slice(16, 32)), ("v_proj", slice(16, 32))):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, rows.stop - rows.start, bias=False)
            new.weight.copy_(old.weight[rows])
            setattr(attn, name, new)
        new_o = nn.Linear(32, 64, bias=False)
        new_o.weight.copy_(attn.o_proj.weight[:, 32:64])
        attn.o_proj = new_o
    for criterion in (MagnitudeCriterion(), ActivationCriterion(batch_size=2)):
        scores = criterion.score(model, random_windows())
        assert [s.numel() for s in scores.attention] == [1, 0, K]
        assert [s.numel() for s in scores.mlp] == [C, C, 0]
    expected = sum(lin.weight.abs().sum() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    torch.testing.assert_close(MagnitudeCriterion().score(model, None).attention[0], expected.reshape(1))


def test_registry_and_get_criterion() -> None:
    for name in CRITERIA.names():
        cls = CRITERIA.get(name)
        assert cls.name == name and isinstance(get_criterion(name), cls)
    assert get_criterion("activation", batch_size=4).batch_size == 4
    with pytest.raises(UserError, match=", ".join(CRITERIA.names())):
        get_criterion("wanda")
    with pytest.raises(UserError, match="magnitude"):
        get_criterion("magnitude", batch_size=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_sum_exactly_what_zeroing_the_structure_removes(arch: str) -> None:
    """Per family, fused projections included: a structure's magnitude score is the |W| mass that
    zeroing it (the oracle's view of removal) takes out of the model."""
    import copy

    from pruning.planning.plan import LayerPlan, PruningPlan
    from tests.oracle import zero_plan_structures
    from tests.tiny_models import tiny_model as family_model

    model = family_model(arch)
    scores = MagnitudeCriterion().score(model, None)
    dense_mass = sum(p.detach().abs().sum() for p in model.parameters())
    kv, channels = scores.attention[1].numel(), scores.mlp[1].numel()
    for groups, chans, expected in (
        ((1,), (), scores.attention[1][1]),
        ((), (0, 5), scores.mlp[1][[0, 5]].sum()),
    ):
        layers = tuple(
            LayerPlan(i, kv, channels, groups if i == 1 else (), chans if i == 1 else ()) for i in range(5)
        )
        zeroed = copy.deepcopy(model)
        zero_plan_structures(zeroed, PruningPlan(layers=layers))
        removed = dense_mass - sum(p.detach().abs().sum() for p in zeroed.parameters())
        torch.testing.assert_close(removed, expected, rtol=1e-4, atol=1e-4)


def test_taylor_with_gradient_checkpointing_recomputes_layers_and_gives_the_same_scores() -> None:
    from pruning.families import adapter_for
    from tests.tiny_models import input_ids, tiny_model

    model = tiny_model("llama_gqa")
    windows = input_ids(batch=4, length=12)
    plain = TaylorCriterion(batch_size=2).score(model, windows)
    calls: list[int] = []
    layer = adapter_for(model.config).decoder_layers(model)[1]
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    checkpointed = TaylorCriterion(batch_size=2, gradient_checkpointing=True).score(model, windows)
    handle.remove()
    assert len(calls) == 2 * 2  # two batches, each layer run again in the backward
    for a, b in zip(plain.attention + plain.mlp, checkpointed.attention + checkpointed.mlp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert not model.is_activation_checkpointing and not any(m.training for m in model.modules())
