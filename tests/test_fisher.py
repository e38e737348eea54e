"""The loss's Fisher diagonal at each output projection (``pruning.calibration.fisher``) and the criterion
that
weights removals by it."""

from __future__ import annotations

import torch

from pruning.calibration.fisher import output_fisher
from pruning.criteria.registry import get_criterion
from pruning.families import adapter_for
from tests.tiny_models import input_ids, tiny_model


def test_it_is_the_mean_squared_gradient_of_the_summed_loss_at_each_projection_output() -> None:
    model = tiny_model("llama_gqa")
    windows = input_ids(batch=5, length=10)
    fisher = output_fisher(model, windows, batch_size=2)

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
