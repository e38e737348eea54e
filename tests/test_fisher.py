"""The loss's Fisher diagonal at each output projection (``pruning.calibration.fisher``) and the criterion
that
weights removals by it."""

from __future__ import annotations

import pytest
import torch

from pruning.calibration.fisher import output_fisher
from pruning.criteria.registry import get_criterion
from pruning.families import adapter_for
from tests.tiny_models import ARCHS, input_ids, tiny_model


@pytest.mark.parametrize("engine", ["layerwise", "whole_model"])
def test_it_is_the_mean_squared_gradient_of_the_summed_loss_at_each_projection_output(engine: str) -> None:
    model = tiny_model("llama_gqa")
    windows = input_ids(batch=5, length=10)
    fisher = output_fisher(model, windows, batch_size=2, engine=engine)

    layers = adapter_for(model.config).decoder_layers(model)
    outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = [
        layer.get_submodule(path).register_forward_hook(
            lambda m, a, out, key=(i, path): outputs.setdefault(key, []).append(out)
        )
        for i, layer in enumerate(layers)
        for path in ("self_attn.o_proj", "mlp.down_proj")
    ]
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(windows).detach().requires_grad_(True)
        loss = sum(
            model(inputs_embeds=embeds[b : b + 1], labels=windows[b : b + 1]).loss * windows.shape[1]
            for b in range(len(windows))
        )
        keys = sorted(outputs)
        grads = torch.autograd.grad(loss, [t for k in keys for t in outputs[k]])
    for h in handles:
        h.remove()
    per_key = iter(grads)
    assert sorted(fisher) == keys
    for key in keys:
        g = torch.cat([next(per_key) for _ in outputs[key]])
        expected = g.pow(2).reshape(-1, g.shape[-1]).sum(dim=0) / windows.numel()
        torch.testing.assert_close(fisher[key], expected, rtol=1e-4, atol=1e-10)


def test_it_leaves_no_gradient_and_restores_requires_grad() -> None:
    model = tiny_model("qwen2")
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    output_fisher(model, input_ids(batch=2, length=8), batch_size=1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_obs_fisher_ranks_differently_from_obs_on_one_scale() -> None:
    """Same greedy removal, other weights: the loss, not the residual stream's energy, sets the scale."""
    model = tiny_model("llama_gqa")
    windows = input_ids(batch=6, length=12)
    plain = get_criterion("obs", batch_size=3).score(model, windows)
    weighted = get_criterion("obs_fisher", batch_size=3).score(model, windows)
    assert weighted.common_scale and plain.common_scale
    assert [s.shape for s in weighted.mlp] == [s.shape for s in plain.mlp]
    ratios = torch.stack([(w.sum() / p.sum()) for w, p in zip(weighted.mlp, plain.mlp, strict=True)])
    assert ratios.max() / ratios.min() > 1.01  # layers are re-weighted, not rescaled alike


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_layerwise_backward_gives_the_whole_model_backward_statistics(arch: str, batch_size: int) -> None:
    """Reverse, layer by layer, each layer's forward recomputed from its kept input: the same squared
    gradients as one backward through the whole model, for every family (Gemma's scaled embeddings,
    soft-capped logits and sliding layers included) and at a batch size that leaves a ragged last batch."""
    model = tiny_model(arch)
    windows = input_ids(batch=5, length=10)
    layerwise = output_fisher(model, windows, batch_size, engine="layerwise")
    whole = output_fisher(model, windows, batch_size, engine="whole_model")
    assert sorted(layerwise) == sorted(whole) and len(whole) == 2 * len(
        adapter_for(model.config).decoder_layers(model)
    )
    for key, value in whole.items():
        assert value.abs().max() > 0
        torch.testing.assert_close(layerwise[key], value, rtol=1e-5, atol=1e-12)


def test_the_layerwise_backward_keeps_the_model_as_it_was() -> None:
    model = tiny_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output_fisher(model, input_ids(batch=3, length=8), batch_size=2, engine="layerwise")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert "forward" not in vars(adapter_for(model.config).decoder_layers(model)[-1])


def test_fisher_samples_takes_evenly_spaced_windows_and_only_those() -> None:
    """A mix's windows come source after source; the subset spreads over them, and the Fisher of a
    subset is the Fisher of exactly those windows."""
    from pruning.criteria.obs_fisher import evenly_spaced

    windows = torch.arange(128)[:, None].repeat(1, 4)
    assert evenly_spaced(windows, 5)[:, 0].tolist() == [0, 32, 64, 95, 127]
    assert evenly_spaced(windows, None) is windows and evenly_spaced(windows, 500) is windows
    model = tiny_model("qwen2")
    ids = input_ids(batch=6, length=8)
    subset = output_fisher(model, evenly_spaced(ids, 3), batch_size=2)
    direct = output_fisher(model, ids[[0, 2, 5]], batch_size=2)
    assert all(torch.equal(subset[k], direct[k]) for k in direct)
