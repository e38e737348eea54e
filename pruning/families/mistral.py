"""Mistral: the Llama layout with no biases anywhere (``attention_bias`` is not read) and sliding-window
attention, which pruning does not touch."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.llama import LlamaFamily


class MistralFamily(LlamaFamily):
    name = "mistral"
    model_types = ("mistral",)
    class_prefix = "Mistral"
    gguf_arch = "llama"  # llama.cpp stores Mistral as llama
    config_defaults = MappingProxyType({"num_key_value_heads": 8})

    def qkv_bias(self, config: Any) -> bool:
        return False

    def o_bias(self, config: Any) -> bool:
        return False

    def mlp_bias(self, config: Any) -> bool:
        return False
