"""A model reduced to what analysis needs: its config and the shape of every parameter.

Every input kind (live model, config.json, safetensors headers, GGUF, opted-in pickle) is turned into
one ``Inventory``, so the counting code is written once and a checkpoint analysed from disk gives the
same report as the live model it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pruning.storage.weight_files import numel

if TYPE_CHECKING:
    from pruning.families import FamilyAdapter

__all__ = ["Inventory", "arch_prefix_for", "dtype_name", "numel", "split_layer_name"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass
class Inventory:
    """Parameter shapes by name (tied weights listed once) plus the facts the shapes cannot tell."""

    shapes: dict[str, tuple[int, ...]]
    model_type: str
    hidden_size: int
    head_dim: int
    num_layers: int
    dtype: str
    tied_embeddings: bool
    source: str
    arch_prefix: str = ""
    # Class names of attention / MLP blocks by layer, when a live module tells them.
    block_types: dict[tuple[int, str], str] = field(default_factory=dict)
    # Whose names the parameters follow; the Llama naming for a family without an adapter.
    family: FamilyAdapter | None = None

    def block_type(self, layer_idx: int, block: str, has_params: bool) -> str:
        """Class name of a block: the live one if known, else the family's class, or Zero* when empty."""
        known = self.block_types.get((layer_idx, block))
        if known:
            return known
        suffix = "Attention" if block == "attention" else "MLP"
        return f"{self.arch_prefix}{suffix}" if has_params else f"Zero{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``model.layers.3.<rest>`` -> ``(3, "<rest>")``, else None."""
    match = _LAYER_RE.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def arch_prefix_for(config: Any) -> str:
    """Class-name prefix of a family without an adapter (``GPT2LMHeadModel``...), for naming blocks."""
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
            if arch.endswith(suffix):
                return arch[: -len(suffix)]
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")
        return arch.removesuffix("ForCausalLM")
    except ImportError:  # pragma: no cover - transformers is a dependency
        return config.model_type.capitalize()


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"BF16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    text = str(dtype).removeprefix("torch.")
    return _SAFETENSORS_DTYPES.get(text, text)


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
