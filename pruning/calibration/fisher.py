"""How much the loss cares about each output dimension of each block: the empirical Fisher diagonal
``E[(dL/dy_i)^2]`` of the causal-LM loss with respect to the output ``y`` of every output projection
(``o_proj``, ``down_proj``) that structures own columns of.

``obs_fisher`` weights a removal's output error by it. The error a removal leaves, ``e = W_S x_S``
after the refit, changes the loss by about ``1/2 e^T F e`` (second order, the gradient's mean being
near zero at a trained model); with ``F`` taken diagonal that is ``sum_i F_ii e_i^2``: row ``i`` of the
error counts ``F_ii`` times. It is the same scale for every layer and both block types (the loss),
so no per-layer normalisation is needed, and it sees what the residual-energy normalisation cannot:
how much later layers amplify or wash out an error made here.

Needs one backward through the whole model per batch (like ``taylor``), but no parameter gradients:
the input embeddings' output is made to require a gradient, and hooks on each projection's output
accumulate the squared gradients, one vector of ``hidden_size`` per projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.calibration.engine import Handle, batches, input_device
from pruning.errors import UserError
from pruning.families import KINDS, adapter_for

Key = tuple[int, str]  # (layer index, the projection's path in the layer)


def output_fisher(model: nn.Module, windows: torch.LongTensor, batch_size: int) -> dict[Key, torch.Tensor]:
    """Per output projection, the mean over tokens of the squared gradient of the summed token loss
    with respect to each of its outputs (float32, on the CPU)."""
    if any(p.is_meta for p in model.parameters()):
        raise UserError(
            "pruning.importance: obs_fisher needs a backward through the whole model, which a streamed "
            "model cannot do; use obs, or a device_map that holds the model"
        )
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    sums: dict[Key, torch.Tensor] = {}
    tokens = windows.numel()
    handles: list[Handle] = []

    def watch(key: Key):
        def forward_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            def grad_hook(grad: torch.Tensor) -> None:
                sq = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0).cpu()
                sums[key] = sums[key] + sq if key in sums else sq

            if output.requires_grad:
                output.register_hook(grad_hook)

        return forward_hook

    for idx, layer in enumerate(adapter.decoder_layers(model)):
        geo = adapter.geometry(layer, head_dim)
        for kind in KINDS:
            for owned in adapter.owned_slices(kind, geo) if geo.count(kind) else ():
                if owned.axis == 1:
                    module = layer.get_submodule(owned.path)
                    handles.append(module.register_forward_hook(watch((idx, owned.path))))
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in tqdm(batches(windows, batch_size), desc="fisher gradients", unit="batch"):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * batch.numel()).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
        model.train(was_training)
    return {key: total / tokens for key, total in sums.items()}
