"""Where the prunable pieces of each supported model family live.

Llama, Mistral, Qwen2 and Qwen3 share one layout in transformers 5: ``model.model.layers[i]`` holds
``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and two RMSNorms. Geometry (heads, KV heads,
intermediate size) is always read from weight shapes, because attention modules in transformers 5 carry
no ``num_heads`` and a pruned model has different sizes per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pruning.errors import UserError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of one decoder layer as its weights have them now (0 for a block that was removed)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio); removing one KV group removes this many query heads."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


def check_supported(config: Any) -> str:
    """Return the config's model_type, or raise a UserError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture {model_type!r}: pruning supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def head_dim_of(config: Any) -> int:
    """Per-head width: the config's ``head_dim`` when set, else hidden_size / num_attention_heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} has no decoder layers at model.layers")
    return layers


def layer_geometry(layer: nn.Module, head_dim: int) -> LayerGeometry:
    """Read heads, KV heads and intermediate size of one decoder layer from its weight shapes."""
    attn, mlp = layer.self_attn, layer.mlp
    q_proj = getattr(attn, "q_proj", None)
    k_proj = getattr(attn, "k_proj", None)
    gate = getattr(mlp, "gate_proj", None)
    return LayerGeometry(
        num_heads=q_proj.weight.shape[0] // head_dim if q_proj is not None else 0,
        num_kv_heads=k_proj.weight.shape[0] // head_dim if k_proj is not None else 0,
        head_dim=head_dim,
        intermediate_size=gate.weight.shape[0] if gate is not None else 0,
    )
