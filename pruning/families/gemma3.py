"""Gemma 3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``): the Gemma 2 layout plus
Qwen3-style ``q_norm`` / ``k_norm`` over ``head_dim``, which stay when heads go and leave with an emptied
attention block. Sliding and global layers differ only in their mask and rotary base, which pruning does
not touch. The multimodal ``Gemma3ForConditionalGeneration`` (model_type ``gemma3``) is not handled: its
decoder sits under ``model.language_model`` beside a vision tower.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.gemma2 import Gemma2Family


class Gemma3Family(Gemma2Family):
    name = "gemma3"
    model_types = ("gemma3_text",)
    class_prefix = "Gemma3"
    gguf_arch = "gemma3"
    gguf_names = MappingProxyType(
        {**Gemma2Family.gguf_names, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    )

    def attention_extras(self, config: Any, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,)}
