"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases always present and no other bias.

A KV group owns its q/k/v bias entries with its rows, so they go with it.
"""

from __future__ import annotations

from typing import Any

from pruning.families.llama import LlamaFamily


class Qwen2Family(LlamaFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    class_prefix = "Qwen2"
    gguf_arch = "qwen2"

    def qkv_bias(self, config: Any) -> bool:
        return True

    def o_bias(self, config: Any) -> bool:
        return False

    def mlp_bias(self, config: Any) -> bool:
        return False
