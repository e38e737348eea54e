"""Gemma 2: the Llama projections inside "sandwich" norms, and norms that scale by ``1 + weight``.

A layer is ``input_layernorm -> self_attn -> post_attention_layernorm -> + residual ->
pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm -> + residual``. Note the name clash
with Llama: here ``post_attention_layernorm`` normalises the attention *output*; the MLP's input norm is
``pre_feedforward_layernorm``. An emptied block outputs zeros, the post-norm of zeros is zeros, so both
of its norms go with it. Removing heads or channels leaves the post-norm in place: it normalises over
the hidden size, which does not change.

The post-norm rescales a block's output before it reaches the residual stream, so what a structure
writes is its output projection's contribution times ``gain / rms(block output)``; ``output_norm``
tells the activation criterion where to measure that (see ``pruning.importance``).
"""

from __future__ import annotations

from types import MappingProxyType

from pruning.families.base import ATTENTION
from pruning.families.llama import LlamaFamily


class Gemma2Family(LlamaFamily):
    name = "gemma2"
    model_types = ("gemma2",)
    class_prefix = "Gemma2"
    gguf_arch = "gemma2"
    gguf_names = MappingProxyType(
        {
            **LlamaFamily.gguf_names,
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    )
    config_defaults = MappingProxyType(
        {"num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True}
    )
    norm_gain_offset = 1.0

    def mlp_bias(self, config: object) -> bool:
        return False

    def block_norms(self, kind: str) -> tuple[str, ...]:
        if kind == ATTENTION:
            return ("input_layernorm", "post_attention_layernorm")
        return ("pre_feedforward_layernorm", "post_feedforward_layernorm")

    def output_norm(self, kind: str) -> str | None:
        return "post_attention_layernorm" if kind == ATTENTION else "post_feedforward_layernorm"
