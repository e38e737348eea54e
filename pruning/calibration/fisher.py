"""How much the loss cares about each output dimension of each block: the empirical Fisher diagonal
``E[(dL/dy_i)^2]`` of the causal-LM loss with respect to the output ``y`` of every output projection
(``o_proj``, ``down_proj``) that structures own columns of.

``obs_fisher`` weights a removal's output error by it. The error a removal leaves, ``e = W_S x_S``
after the refit, changes the loss by about ``1/2 e^T F e`` (second order, the gradient's mean being
near zero at a trained model); with ``F`` taken diagonal that is ``sum_i F_ii e_i^2``: row ``i`` of the
error counts ``F_ii`` times. It is the same scale for every layer and both block types (the loss),
so no per-layer normalisation is needed, and it sees what the residual-energy normalisation cannot:
how much later layers amplify or wash out an error made here.

It needs the loss's gradient at every layer, but no parameter gradients. Two engines give the same
statistics (``calibration.engine``):

- ``layerwise`` (the default): the windows go forward one decoder layer at a time, keeping each
  layer's input; the model's own head turns the last layer's output into the loss and its gradient
  (``pruning.calibration.layer_head``); then the layers run backward in reverse, each recomputing its
  forward from its kept input and passing the gradient at its input down to the layer below. Only one
  layer's weights and one batch's activations are needed at a time, so a streamed model (or one spread
  over devices) gets the loss-aware criterion too; the kept inputs cost ``layers x tokens x hidden``
  values of the model's dtype.
- ``whole_model``: one ordinary backward per batch through the model held in memory.

Hooks on each projection's output accumulate the squared gradients, one vector of ``hidden_size`` per
projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.calibration.engine import (
    ENGINES,
    Handle,
    LayerStore,
    ResidentLayers,
    batches,
    capture_layer_inputs,
    input_device,
    run_batch,
)
from pruning.calibration.layer_head import layers_bypassed
from pruning.errors import UserError
from pruning.families import KINDS, adapter_for

Key = tuple[int, str]  # (layer index, the projection's path in the layer)


def output_fisher(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int,
    engine: str = "layerwise",
    store: LayerStore | None = None,
) -> dict[Key, torch.Tensor]:
    """Per output projection, the mean over tokens of the squared gradient of the summed token loss
    with respect to each of its outputs (float32, on the CPU). ``store`` gives the layerwise engine
    each layer's weights when it reaches them (``pruning.calibration.engine.LayerStore``)."""
    if engine not in ENGINES:
        raise UserError(f"calibration.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "whole_model" and any(p.is_meta for p in model.parameters()):
        raise UserError(
            "calibration.engine: whole_model needs every weight in memory; this model is streamed "
            "layer by layer (use layerwise)"
        )
    sums = _SquaredGradients(model)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            if engine == "layerwise":
                _layerwise_backward(model, windows, batch_size, sums, store or ResidentLayers())
            else:
                _whole_model_backward(model, windows, batch_size, sums)
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
        model.train(was_training)
    tokens = windows.numel()
    return {key: total / tokens for key, total in sums.sums.items()}


class _SquaredGradients:
    """Hooks on each output projection's output that add up its squared gradients, per layer."""

    def __init__(self, model: nn.Module) -> None:
        adapter = adapter_for(model.config)
        head_dim = adapter.head_dim(model.config)
        self.layers = adapter.decoder_layers(model)
        self.paths: list[list[str]] = []
        for layer in self.layers:
            geo = adapter.geometry(layer, head_dim)
            self.paths.append(
                [
                    owned.path
                    for kind in KINDS
                    for owned in (adapter.owned_slices(kind, geo) if geo.count(kind) else ())
                    if owned.axis == 1
                ]
            )
        self.sums: dict[Key, torch.Tensor] = {}

    def watch(self, idx: int) -> list[Handle]:
        layer = self.layers[idx]
        return [
            layer.get_submodule(path).register_forward_hook(self._forward_hook((idx, path)))
            for path in self.paths[idx]
        ]

    def _forward_hook(self, key: Key):
        def forward_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            def grad_hook(grad: torch.Tensor) -> None:
                sq = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0).cpu()
                self.sums[key] = self.sums[key] + sq if key in self.sums else sq

            if output.requires_grad:
                output.register_hook(grad_hook)

        return forward_hook


def _whole_model_backward(
    model: nn.Module, windows: torch.LongTensor, batch_size: int, sums: _SquaredGradients
) -> None:
    """One ordinary backward per batch; the embeddings' output is made to require a gradient."""
    handles = [h for idx in range(len(sums.layers)) for h in sums.watch(idx)]
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    device = input_device(model)
    try:
        for batch in tqdm(batches(windows, batch_size), desc="fisher gradients", unit="batch"):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.numel()).backward()
    finally:
        for handle in handles:
            handle.remove()


def _layerwise_backward(
    model: nn.Module, windows: torch.LongTensor, batch_size: int, sums: _SquaredGradients, store: LayerStore
) -> None:
    """Forward layer by layer keeping each layer's input, the loss's gradient at the last layer's
    output from the model's own head, then each layer backward in reverse (its forward recomputed)."""
    layers = sums.layers
    with torch.no_grad(), store.outside_layers():
        inputs = capture_layer_inputs(model, windows, batch_size)
    kept: list[list[torch.Tensor]] = []  # [layer][batch]: what the layer received
    hidden = inputs.hidden
    for idx in tqdm(range(len(layers)), desc="fisher, forward layer by layer", unit="layer"):
        device = store.load(idx, layers[idx])
        try:
            kept.append([h.cpu() for h in hidden])
            with torch.no_grad():
                hidden = [run_batch(layers[idx], h, inputs, idx, b, device) for b, h in enumerate(hidden)]
        finally:
            store.unload(idx, layers[idx])
    grads = _head_gradients(model, windows, batch_size, hidden, store)
    for idx in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher, backward", unit="layer"):
        device = store.load(idx, layers[idx])
        handles = sums.watch(idx)
        try:
            for b, x in enumerate(kept[idx]):
                x = x.to(device).requires_grad_(True)
                out = run_batch(layers[idx], x, inputs, idx, b, device)
                out.backward(grads[b].to(out.device))
                grads[b] = x.grad.cpu()
            kept[idx] = []
        finally:
            for handle in handles:
                handle.remove()
            store.unload(idx, layers[idx])


def _head_gradients(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int,
    final: list[torch.Tensor],
    store: LayerStore,
) -> list[torch.Tensor]:
    """Per batch, the gradient of the summed token loss at the last decoder layer's output: the model's
    own forward (final norm, head, soft-capping, loss) around that output."""
    leaves: list[torch.Tensor] = []

    def last_output(hidden: torch.Tensor) -> torch.Tensor:
        leaf = final[len(leaves)].detach().to(hidden.device).requires_grad_(True)
        leaves.append(leaf)
        return leaf

    grads = []
    with store.outside_layers(head=True), layers_bypassed(model, last_output):
        device = model.get_input_embeddings().weight.device
        for batch in batches(windows, batch_size):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.numel()).backward()
            grads.append(leaves[-1].grad.cpu())
    return grads
