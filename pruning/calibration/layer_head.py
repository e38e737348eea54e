"""The model's own code around decoder outputs computed layer by layer: logits (perplexity of a streamed
model) and the loss's gradient at the last layer's output (the layerwise Fisher backward).

A family's forward does more than its decoder layers: embeddings (Gemma scales them), the final norm,
the head, logit soft-capping, the loss. Rather than copy that per family, every decoder layer's forward
is replaced (``layers_bypassed``) and the model's own forward runs around outputs computed elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pruning.calibration.engine import LayerStore, ResidentLayers, batches, forwards_replaced, run_layerwise
from pruning.families import adapter_for


@torch.no_grad()
def layerwise_logits(
    model: nn.Module, windows: torch.LongTensor, batch_size: int, store: LayerStore | None = None
) -> Iterator[tuple[torch.LongTensor, torch.Tensor]]:
    """(batch, logits) for every batch, computed layer by layer (one layer's weights at a time when
    ``store`` streams them): the model's own forward then turns the last layer's outputs into logits,
    with every decoder layer's forward replaced (the last one hands back its cached outputs), so the
    final norm, head and any logit soft-capping are the family's own code. The logits equal a
    whole-model forward's."""
    store = store or ResidentLayers()
    was_training = model.training
    model.eval()
    try:
        final = run_layerwise(model, windows, batch_size, [], store=store)
        with store.outside_layers(head=True), layers_bypassed(model, lambda h: final.pop(0).to(h.device)):
            device = model.get_input_embeddings().weight.device
            for batch in batches(windows, batch_size):
                yield batch, model(input_ids=batch.to(device), use_cache=False).logits
    finally:
        model.train(was_training)


@contextlib.contextmanager
def layers_bypassed(model: nn.Module, last_output: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside, every decoder layer's forward is replaced: the first ones pass their input on, and the
    last returns ``last_output(its input)``. The model's own forward then runs only what lies outside
    the layers (embeddings; the final norm, head, logit soft-capping and loss) around decoder outputs
    computed elsewhere, layer by layer."""
    layers = adapter_for(model.config).decoder_layers(model)

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def last(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return last_output(hidden_states)

    with forwards_replaced(layers, [passthrough] * (len(layers) - 1) + [last]):
        yield
