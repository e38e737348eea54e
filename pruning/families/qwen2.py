"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases always present and no other bias.

A KV group owns its q/k/v bias entries with its rows, so they go with it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.llama import LlamaFamily


class Qwen2Family(LlamaFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    class_prefix = "Qwen2"
    gguf_arch = "qwen2"
    config_defaults = MappingProxyType({"num_key_value_heads": 32})

    def qkv_bias(self, config: Any) -> bool:
        return True

    def o_bias(self, config: Any) -> bool:
        return False

    def mlp_bias(self, config: Any) -> bool:
        return False
