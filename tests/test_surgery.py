"""Surgery against the correctness oracle: removing structures == zeroing them in a dense copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.families import adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_plan, pruned_layout
from tests.oracle import zero_plan_structures
from tests.tiny_models import ARCH_IMPLS, ARCHS, TIED_ARCHS, input_ids, make_plan, tiny_model

# Families with separate q/k/v and gate/up Linears, whose rows these tests check by name (Phi-3's fused
# projections are checked in tests/test_families.py).
SEPARATE_PROJECTIONS = tuple(arch for arch in ARCHS if arch != "phi3")


def _pruned_and_zeroed(arch: str, impl: str = "eager"):
    """(pruned model, zeroed dense copy, plan, untouched dense copy)."""
    model = tiny_model(arch, impl)
    plan = make_plan(model)
    dense = copy.deepcopy(model)
    zeroed = copy.deepcopy(model)
    zero_plan_structures(zeroed, plan)
    apply_plan(model, plan)
    return model, zeroed, plan, dense


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generate(model: nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPLS)
def test_pruned_logits_equal_zeroed_dense(arch: str, impl: str, batch: int) -> None:
    model, zeroed, _, dense = _pruned_and_zeroed(arch, impl)
    ids = input_ids(batch=batch)
    with torch.no_grad():
        pruned_logits, zeroed_logits, dense_logits = (m(ids).logits for m in (model, zeroed, dense))
    torch.testing.assert_close(pruned_logits, zeroed_logits, atol=1e-4, rtol=0)
    assert (pruned_logits - dense_logits).abs().max() > 0.1  # the plan really changed the function


@pytest.mark.parametrize("arch", ARCHS)
def test_emptied_blocks_and_their_norms_are_replaced(arch: str) -> None:
    model, zeroed, plan, dense = _pruned_and_zeroed(arch)
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in (layers[0], layers[2]):
        assert isinstance(layer.self_attn, ZeroAttention)
        assert all(isinstance(layer.get_submodule(n), nn.Identity) for n in adapter.block_norms("attention"))
    for layer in (layers[2], layers[3]):
        assert isinstance(layer.mlp, ZeroMLP)
        assert all(isinstance(layer.get_submodule(n), nn.Identity) for n in adapter.block_norms("mlp"))
    for kind in ("attention", "mlp"):
        assert not any(isinstance(layers[1].get_submodule(n), nn.Identity) for n in adapter.block_norms(kind))
    kv = [lp.num_kv_groups - len(lp.remove_kv_groups) for lp in plan.layers]
    inter = [lp.num_channels - len(lp.remove_channels) for lp in plan.layers]
    assert pruned_layout(model).to_json() == {
        "version": 1,
        "num_attention_heads": [k * group for k in kv],
        "num_key_value_heads": kv,
        "intermediate_size": inter,
    }
    # the zeroed model keeps every shape
    assert [tuple(p.shape) for p in zeroed.parameters()] == [tuple(p.shape) for p in dense.parameters()]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_shapes_equal_the_rules_for_the_layout(arch: str) -> None:
    """Every parameter of the pruned model has the shape the family's rules give for its layout, and a
    meta-device build of the saved config has the same parameters (the count a reload will see)."""
    from pruning.checkpoint.load import build_pruned_skeleton

    model, _, _, _ = _pruned_and_zeroed(arch)
    adapter = adapter_for(model.config)
    config = model.config.to_dict() | {"pruning_layout": pruned_layout(model).to_json()}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == adapter.parameter_shapes(config)
    skeleton = build_pruned_skeleton(config)
    assert {name: tuple(p.shape) for name, p in skeleton.named_parameters()} == shapes
    assert _numel(skeleton) == _numel(model)


@pytest.mark.parametrize("arch", SEPARATE_PROJECTIONS)
def test_structure_after_surgery(arch: str) -> None:
    model, _, plan, _ = _pruned_and_zeroed(arch)
    layers = adapter_for(model.config).decoder_layers(model)
    hd, hidden = adapter_for(model.config).head_dim(model.config), model.config.hidden_size
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    kv = [lp.num_kv_groups - len(lp.remove_kv_groups) for lp in plan.layers]
    inter = [lp.num_channels - len(lp.remove_channels) for lp in plan.layers]
    attn, mlp = layers[1].self_attn, layers[1].mlp
    assert (attn.q_proj.out_features, attn.q_proj.in_features) == tuple(attn.q_proj.weight.shape)
    assert attn.o_proj.in_features == attn.o_proj.weight.shape[1] == kv[1] * group * hd
    assert attn.k_proj.out_features == attn.v_proj.out_features == kv[1] * hd
    assert mlp.down_proj.in_features == mlp.gate_proj.out_features == mlp.up_proj.out_features == inter[1]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj):
        if proj.bias is not None:
            assert proj.bias.shape == (proj.out_features,)
    assert mlp.down_proj.out_features == hidden


@pytest.mark.parametrize("arch", SEPARATE_PROJECTIONS)
def test_surgery_keeps_the_right_rows(arch: str) -> None:
    """Kept KV head / query heads / channels are exactly the dense ones, in order."""
    model, _, plan, dense = _pruned_and_zeroed(arch)
    hd = adapter_for(model.config).head_dim(model.config)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    lp = plan.layers[1]
    new, old = (
        adapter_for(model.config).decoder_layers(model)[1],
        adapter_for(dense.config).decoder_layers(dense)[1],
    )
    for new_pos, g in enumerate(lp.keep_kv_groups):
        kv_new, kv_old = slice(new_pos * hd, (new_pos + 1) * hd), slice(g * hd, (g + 1) * hd)
        q_new = slice(new_pos * group * hd, (new_pos + 1) * group * hd)
        q_old = slice(g * group * hd, (g + 1) * group * hd)
        new_attn, old_attn = new.self_attn, old.self_attn
        torch.testing.assert_close(new_attn.k_proj.weight[kv_new], old_attn.k_proj.weight[kv_old])
        torch.testing.assert_close(new_attn.v_proj.weight[kv_new], old_attn.v_proj.weight[kv_old])
        torch.testing.assert_close(new_attn.q_proj.weight[q_new], old_attn.q_proj.weight[q_old])
        torch.testing.assert_close(new_attn.o_proj.weight[:, q_new], old_attn.o_proj.weight[:, q_old])
    keep = list(lp.keep_channels)
    torch.testing.assert_close(new.mlp.up_proj.weight, old.mlp.up_proj.weight[keep])
    torch.testing.assert_close(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, keep])


def _expected_removed(dense: nn.Module, plan: PruningPlan) -> int:
    """Parameters of the removed structures, counted from the dense layers' shapes and biases."""
    adapter = adapter_for(dense.config)
    hd = adapter.head_dim(dense.config)
    group = dense.config.num_attention_heads // dense.config.num_key_value_heads
    total = 0
    for layer, lp in zip(adapter.decoder_layers(dense), plan.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if lp.attention_removed:
            total += _numel(attn) + sum(
                _numel(layer.get_submodule(n)) for n in adapter.block_norms("attention")
            )
        else:
            q_bias, kv_bias = attn.q_proj.bias is not None, attn.k_proj.bias is not None
            hidden = attn.q_proj.in_features
            per_group = group * hd * (2 * hidden + q_bias) + 2 * hd * (hidden + kv_bias)
            total += per_group * len(lp.remove_kv_groups)
        if lp.mlp_removed:
            total += _numel(mlp) + sum(_numel(layer.get_submodule(n)) for n in adapter.block_norms("mlp"))
        else:
            gate_bias = mlp.gate_proj.bias is not None
            per_channel = 3 * mlp.gate_proj.in_features + 2 * gate_bias
            total += per_channel * len(lp.remove_channels)
    return total


@pytest.mark.parametrize("arch", SEPARATE_PROJECTIONS)
def test_parameter_count_drops_by_exactly_the_removed_structures(arch: str) -> None:
    model, _, plan, dense = _pruned_and_zeroed(arch)
    removed = _expected_removed(dense, plan)
    assert removed > 0
    assert _numel(model) == _numel(dense) - removed


@pytest.mark.parametrize("arch", TIED_ARCHS)
def test_tied_embeddings_stay_tied(arch: str) -> None:
    model, _, _, dense = _pruned_and_zeroed(arch)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == dense.model.embed_tokens.weight.shape


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_loss_backward(arch: str) -> None:
    model, _, _, _ = _pruned_and_zeroed(arch)
    model.train()
    ids = input_ids()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name
    assert (
        next(adapter_for(model.config).decoder_layers(model)[1].self_attn.parameters()).grad.abs().sum() > 0
    )


def test_requires_grad_is_preserved() -> None:
    model = tiny_model("llama_gqa")
    model.requires_grad_(False)
    apply_plan(model, make_plan(model))
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPLS)
def test_generate_with_and_without_cache(arch: str, impl: str) -> None:
    """Layer 0 is ZeroAttention: the cache length must still be right for cached generation."""
    model, zeroed, _, _ = _pruned_and_zeroed(arch, impl)
    ids = input_ids(length=10)
    with torch.no_grad():
        cached, uncached, reference = (
            _generate(model, ids, True),
            _generate(model, ids, False),
            _generate(zeroed, ids, True),
        )
    assert cached.shape == (ids.shape[0], ids.shape[1] + 12)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize(
    ("arch", "impl"),
    [pair for pair in ARCH_IMPLS if pair[0] in ("llama_gqa", "mistral", "phi3", "gemma2", "gemma3")],
)
def test_incremental_forward_with_cache(arch: str, impl: str) -> None:
    """Without explicit positions, transformers reads past length from layer 0's cache entry, which
    ZeroAttention writes; a wrong length shifts positions and breaks the mask."""
    model, _, _, _ = _pruned_and_zeroed(arch, impl)
    ids = input_ids(length=12)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :9], use_cache=True)
        cache = first.past_key_values
        assert cache.get_seq_length() == 9
        step = model(ids[:, 9:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 9:], atol=1e-4, rtol=0)


def test_plan_must_match_model() -> None:
    model = tiny_model("llama_gqa")
    plan = make_plan(model)
    with pytest.raises(ValueError, match="layers"):
        apply_plan(model, PruningPlan(layers=plan.layers[:-1]))
    wrong = (LayerPlan(0, 3, 96, (0,)), *plan.layers[1:])
    with pytest.raises(ValueError, match="layer 0"):
        apply_plan(model, PruningPlan(layers=wrong))
    with pytest.raises(ValueError, match="layer 0"):
        zero_plan_structures(model, PruningPlan(layers=wrong))
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="pruned already"):
        apply_plan(model, plan)  # indices refer to the dense layer: a second application is refused


def test_plan_for_pruned_shapes_prunes_again() -> None:
    """A plan made from the current (already pruned) shapes is accepted and still matches the oracle."""
    model = tiny_model("qwen2")
    apply_plan(model, make_plan(model))
    layout = pruned_layout(model)
    sizes = enumerate(zip(layout.num_key_value_heads, layout.intermediate_size, strict=True))
    second = PruningPlan(
        layers=tuple(LayerPlan(i, kv, ch, remove_channels=(0,) if i == 1 else ()) for i, (kv, ch) in sizes)
    )
    zeroed = copy.deepcopy(model)
    zero_plan_structures(zeroed, second)
    apply_plan(model, second)
    assert (
        adapter_for(model.config).decoder_layers(model)[1].mlp.gate_proj.out_features
        == layout.intermediate_size[1] - 1
    )
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, atol=1e-4, rtol=0)


def test_a_plan_entry_for_another_layer_is_refused() -> None:
    """Plans are matched to layers by position; an entry that names another layer (a plan reordered or
    filtered by hand) would prune the wrong layer, so it is refused before anything is cut."""
    model = tiny_model("llama_gqa")
    plan = make_plan(model)
    swapped = (plan.layers[1], plan.layers[0], *plan.layers[2:])
    before = {name: p.shape for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="plan entry 0 is for layer 1"):
        apply_plan(model, PruningPlan(layers=swapped))
    assert {name: p.shape for name, p in model.named_parameters()} == before


def test_one_layer_plan_for_other_shapes_is_refused() -> None:
    """The layer-by-layer pass prunes one layer at a time: a plan for another shape (the layer was pruned
    already) must be refused there too, not cut indices that no longer mean the same rows."""
    from pruning.surgery import apply_layer_plan

    model = tiny_model("llama_gqa")
    plan = make_plan(model)
    apply_layer_plan(model, plan.layers[1])
    with pytest.raises(ValueError, match="layer 1: plan expects .*pruned already"):
        apply_layer_plan(model, plan.layers[1])


def test_query_heads_that_do_not_split_into_kv_groups_are_refused() -> None:
    from pruning.families import LayerGeometry
    from pruning.surgery import _check_layer

    with pytest.raises(ValueError, match="layer 2: 6 query heads do not split into 4"):
        _check_layer(2, LayerPlan(2, 4, 8), LayerGeometry(6, 4, 16, 8))
    _check_layer(2, LayerPlan(2, 4, 8), LayerGeometry(8, 4, 16, 8))  # whole groups: accepted


def test_size_attributes_follow_the_new_weights() -> None:
    """An MLP's ``intermediate_size`` attribute must say what its weights hold after surgery (hooks and
    users read it; the saved config is built from the weights, so nothing else would notice)."""
    model = tiny_model("llama_gqa")
    plan = make_plan(model)
    apply_plan(model, plan)
    layer = adapter_for(model.config).decoder_layers(model)[1]
    assert layer.mlp.intermediate_size == plan.layers[1].num_channels - len(plan.layers[1].remove_channels)
    assert layer.mlp.intermediate_size == layer.mlp.gate_proj.out_features


def test_replaced_weights_give_their_file_pages_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each weight surgery replaces is released (its mapped file pages may go), the bias too; without
    it a model loaded from a mapped file keeps the dense copy resident beside the pruned one."""
    from pruning import surgery

    released: list[int] = []
    monkeypatch.setattr(surgery.file_pages, "release", lambda tensor: released.append(tensor.data_ptr()))
    out, into = nn.Linear(4, 6, bias=True), nn.Linear(6, 4, bias=True)
    old = [out.weight.data_ptr(), out.bias.data_ptr(), into.weight.data_ptr()]
    surgery._prune_out(out, [1, 4])
    surgery._prune_in(into, [1, 4])
    assert released == old
    assert out.weight.shape == (4, 4) and out.bias.shape == (4,) and into.weight.shape == (4, 4)
    released.clear()
    surgery._release(None, torch.empty(3, device="meta"))  # nothing to give back: not called
    assert released == []


@pytest.mark.parametrize(
    ("layer0", "message"),
    [
        ((6, 3, 96), "layer 0: 6 heads, 3 KV heads and 96 channels cannot come from a layer of 4, 2 and 96"),
        ((4, 2, 97), "layer 0: 4 heads, 2 KV heads and 97 channels cannot come from"),
        ((3, 1, 64), "layer 0: 3 heads, 1 KV heads and 64 channels cannot come from"),
    ],
)
def test_a_layout_no_dense_layer_can_shrink_to_is_refused(layer0: tuple[int, int, int], message: str) -> None:
    """Each condition alone: more KV heads, more channels, or heads that are not whole dense groups (the
    reloaded modules would not be the ones surgery made)."""
    from pruning.families.layout import LayerSizes, Layout
    from pruning.surgery import resize_to_layout

    model = tiny_model("llama_gqa")
    dense = pruned_layout(model)
    layout = Layout.of([LayerSizes(*layer0), *list(dense)[1:]])
    with pytest.raises(ValueError, match=message):
        resize_to_layout(model, layout)
    assert pruned_layout(model) == dense  # refused before anything was cut
