"""Qwen3: the Llama layout plus ``q_norm`` / ``k_norm``, RMSNorms over ``head_dim`` shared by every head.

They act per head, so removing heads leaves them as they are; they go with an emptied attention block.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.llama import LlamaFamily


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    model_types = ("qwen3",)
    class_prefix = "Qwen3"
    gguf_arch = "qwen3"
    config_defaults = MappingProxyType({"num_key_value_heads": 32, "head_dim": 128})
    gguf_names = MappingProxyType(
        {**LlamaFamily.gguf_names, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    )

    def mlp_bias(self, config: Any) -> bool:
        return False

    def attention_extras(self, config: Any, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,)}
