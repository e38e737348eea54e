"""The ``taylor`` criterion: first-order Taylor ``|W * dL/dW|`` of the causal-LM loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.calibration.engine import batches, input_device
from pruning.criteria.base import Criterion, Importance, owned_linears, score_layers
from pruning.errors import UserError
from pruning.families import OwnedSlice, adapter_for
from pruning.planning.scores import StructureScores


def accumulate_gradients(model: nn.Module, windows: torch.LongTensor, batch_size: int) -> None:
    """Gradients of the mean causal-LM loss over all windows, in ``.grad`` of the parameters that
    require them: a whole-model backward per batch (the loss is global, so this cannot go layer by layer)."""
    device = input_device(model)
    parts = batches(windows, batch_size)
    total = windows.shape[0]
    with torch.enable_grad():
        for batch in tqdm(parts, desc="taylor gradients", unit="batch"):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * (batch.shape[0] / total)).backward()


@dataclass
class TaylorCriterion(Criterion):
    """First-order Taylor |W * dL/dW| on the causal-LM loss, gradients of the mean loss over all windows.

    Needs a whole-model backward: the weights, their gradients for the scored Linears, and one batch's
    activations. ``gradient_checkpointing`` keeps only each decoder layer's input and recomputes the rest
    in the backward (activation memory of one layer instead of all, about one more forward of time).
    requires_grad flags and any existing gradients are restored afterwards.
    """

    name: ClassVar[str] = "taylor"
    needs_backward: ClassVar[bool] = True
    needs_whole_model: ClassVar[bool] = True
    batch_size: int = 1
    gradient_checkpointing: bool = False

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        if any(p.is_meta for p in model.parameters()):
            raise UserError(
                "pruning.importance: taylor needs a backward through the whole model, which a streamed "
                "model cannot do; use activation or magnitude, or a device_map that holds the model"
            )
        all_params = list(model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in all_params]
        adapter = adapter_for(model.config)
        head_dim = adapter.head_dim(model.config)
        layers = adapter.decoder_layers(model)
        scored = [
            p
            for layer in layers
            for _, linear in owned_linears(adapter, layer, head_dim)
            for p in linear.parameters()
        ]
        was_training = model.training
        was_checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        model.eval()  # no dropout; gradients still flow
        try:
            for p in all_params:
                p.requires_grad_(False)
                p.grad = None
            for p in scored:
                p.requires_grad_(True)
            if self.gradient_checkpointing and not was_checkpointing:
                model.activation_checkpointing_enable({"use_reentrant": False})
            if self.gradient_checkpointing:
                for layer in layers:  # transformers checkpoints a layer only in training mode; its
                    layer.training = True  # submodules stay in eval mode, so dropout stays off
            accumulate_gradients(model, windows, self.batch_size)
            return score_layers(model, _taylor_importance, common_scale=True)
        finally:
            for p, requires_grad, grad in saved:
                p.requires_grad_(requires_grad)
                p.grad = grad
            if self.gradient_checkpointing and not was_checkpointing:
                model.activation_checkpointing_disable()
            model.train(was_training)


def _taylor_importance(layer_idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
    def one(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p, dtype=torch.float32)
        return (p.detach().float() * p.grad.float()).abs()

    return one(linear.weight), (one(linear.bias) if linear.bias is not None else None)
