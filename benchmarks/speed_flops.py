"""FLOPs per token from a model's shapes: what a time proportional to the work would give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShapes:
    """What the FLOPs count needs, read from a model's weights (``model_shapes``).

    ``linear_macs``: multiply-adds per token of every linear layer but the output head (sum of
    ``in_features x out_features``); ``head_macs``: those of the output head (``hidden x vocab``);
    ``attention_widths``: per decoder layer, query heads kept x head_dim (0 where attention is removed).
    """

    linear_macs: int
    head_macs: int
    attention_widths: tuple[int, ...]


def forward_flops(shapes: ModelShapes, new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1) -> int:
    """FLOPs of one forward of one sequence over ``new_tokens`` tokens after ``past_tokens`` cached ones,
    with logits for ``logits_tokens`` positions; one multiply-add is 2 FLOPs.

    - Linear layers: each token goes through every linear layer of the decoder once, ``in x out``
      multiply-adds each (q/k/v/o, gate/up/down, fused ones alike; a removed block has none); the output
      head runs only for the positions whose logits are kept (1: the last, as ``generate`` and llama.cpp
      without ``logits_all`` do).
    - Attention: with causal masking, new token ``i`` (0-based) attends to ``past_tokens + i + 1`` keys.
      For each key, every kept query head does one dot product of ``head_dim`` (scores, ``Q K^T``) and
      one ``head_dim``-wide multiply-add of the value (``A V``): ``2 x heads x head_dim`` multiply-adds
      per (query, key) pair, summed over the layers' kept heads (GQA shares K and V between query heads
      but not this work). Kernels that compute the masked half anyway do more; this counts the useful work.
    - Not counted: the embedding lookup (no arithmetic), norms, rotary embedding, softmax, activations,
      residual adds and biases: O(hidden) per token, against O(hidden^2) for the linear layers.

    Prefill of a prompt of length L: ``forward_flops(s, L)``; the decode step that feeds position ``p``:
    ``forward_flops(s, 1, past_tokens=p)``.
    """
    if new_tokens < 1 or past_tokens < 0 or not 0 <= logits_tokens <= new_tokens:
        raise ValueError(f"bad token counts: new {new_tokens}, past {past_tokens}, logits {logits_tokens}")
    linear = new_tokens * shapes.linear_macs + logits_tokens * shapes.head_macs
    pairs = new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2  # (query, key) pairs, causal
    attention = 2 * pairs * sum(shapes.attention_widths)
    return 2 * (linear + attention)


def prefill_flops_per_token(shapes: ModelShapes, prompt_len: int) -> float:
    """FLOPs per prompt token of one prefill (last position's logits only)."""
    return forward_flops(shapes, prompt_len) / prompt_len


def decode_flops_per_token(shapes: ModelShapes, prompt_len: int, new_tokens: int) -> float:
    """FLOPs per token of the ``new_tokens - 1`` decode steps after a prefill of ``prompt_len`` (the
    first new token comes from the prefill): the steps feed positions prompt_len .. prompt_len + new - 2."""
    steps = range(prompt_len, prompt_len + new_tokens - 1)
    if not steps:
        raise ValueError("decode needs new_tokens >= 2")
    return sum(forward_flops(shapes, 1, past_tokens=p) for p in steps) / len(steps)


def model_shapes(model: Any) -> ModelShapes:
    """``ModelShapes`` of a loaded (dense or pruned) causal LM, from its weights."""
    from torch import nn

    from pruning.families import adapter_for

    head = model.get_output_embeddings()
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    widths = tuple(
        adapter.geometry(layer, head_dim).num_heads * head_dim for layer in adapter.decoder_layers(model)
    )
    return ModelShapes(linear, head.in_features * head.out_features, widths)


# ------------------------------------------------------------------------------------------- models
