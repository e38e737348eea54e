"""Parameter-free stand-ins for attention and MLP blocks whose every structure was pruned away.

The decoder layer adds the block's output to the residual stream, so returning zeros makes the layer
pass its input straight through. They hold no parameters, so analysis counts them as zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ZeroAttention(nn.Module):
    """An attention block with no heads left: contributes nothing to the residual stream.

    It still writes a tiny placeholder entry (one head of width 1, zeros) into the KV cache, so the cache's
    sequence length stays right when this is layer 0: transformers reads the number of past tokens from
    layer 0's cache. The entry must not be empty: transformers 5's ``DynamicLayer.get_seq_length`` reports
    0 for a cache whose tensors have no elements, which would silently reset positions and masks.
    """

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, seq_len = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros((batch, 1, seq_len, 1))
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, head_dim={self.head_dim}"


class ZeroMLP(nn.Module):
    """An MLP block with no intermediate channels left: returns zeros."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)
