"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layer with fused projections.

``self_attn.qkv_proj`` stacks q rows (all query heads), then k rows, then v rows, so a KV group owns
three row segments of it; ``mlp.gate_up_proj`` stacks gate rows then up rows (``chunk(2)`` in forward),
so a channel owns row ``c`` and row ``intermediate + c``. No biases.

``Phi3Attention.forward`` splits ``qkv`` at ``config.num_attention_heads * head_dim``, read from the
model-wide config, so a pruned attention module gets a per-layer view of the config with its own head
counts (``LayerConfig``); everything else still reads the shared config, so later changes to it (the
attention implementation) reach the layer.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.base import ATTENTION, LayerGeometry, OwnedSlice, Segment, Shapes
from pruning.families.layout import LayerSizes
from pruning.families.llama import LlamaFamily


class LayerConfig:
    """The shared model config with some values overridden for one module."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = overrides

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name.startswith("__") or "_base" not in state:
            raise AttributeError(name)
        if name in state["_overrides"]:
            return state["_overrides"][name]
        return getattr(state["_base"], name)

    def __repr__(self) -> str:
        return f"LayerConfig({self.__dict__['_overrides']})"


class Phi3Family(LlamaFamily):
    name = "phi3"
    model_types = ("phi3",)
    class_prefix = "Phi3"
    gguf_arch = "phi3"
    gguf_buffers = ("rope_freqs", "rope_factors_long", "rope_factors_short")
    gguf_names = MappingProxyType(
        {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_qkv": "self_attn.qkv_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_up": "mlp.gate_up_proj",
            "ffn_down": "mlp.down_proj",
        }
    )

    def layer_shapes(self, config: Any, sizes: LayerSizes) -> dict[str, tuple[int, ...]]:
        hidden, hd = int(self.value(config, "hidden_size")), self.head_dim(config)
        shapes: dict[str, tuple[int, ...]] = {}
        if sizes.num_heads:
            q, kv = sizes.num_heads * hd, sizes.num_kv_heads * hd
            shapes["self_attn.qkv_proj.weight"] = (q + 2 * kv, hidden)
            shapes["self_attn.o_proj.weight"] = (hidden, q)
            shapes["input_layernorm.weight"] = (hidden,)
        if sizes.intermediate_size:
            inter = sizes.intermediate_size
            shapes["mlp.gate_up_proj.weight"] = (2 * inter, hidden)
            shapes["mlp.down_proj.weight"] = (hidden, inter)
            shapes["post_attention_layernorm.weight"] = (hidden,)
        return shapes

    def owned_slices(self, kind: str, geometry: LayerGeometry) -> tuple[OwnedSlice, ...]:
        hd = geometry.head_dim
        if kind == ATTENTION:
            q_rows, kv_rows = geometry.num_heads * hd, geometry.num_kv_heads * hd
            query = Segment(0, geometry.group_size * hd)
            return (
                OwnedSlice(
                    "self_attn.qkv_proj", 0, (query, Segment(q_rows, hd), Segment(q_rows + kv_rows, hd))
                ),
                OwnedSlice("self_attn.o_proj", 1, (query,)),
            )
        return (
            OwnedSlice("mlp.gate_up_proj", 0, (Segment(0, 1), Segment(geometry.intermediate_size, 1))),
            OwnedSlice("mlp.down_proj", 1, (Segment(0, 1),)),
        )

    def geometry_from_shapes(self, shapes: Shapes, head_dim: int) -> LayerGeometry:
        o_proj, qkv = shapes.get("self_attn.o_proj.weight"), shapes.get("self_attn.qkv_proj.weight")
        down = shapes.get("mlp.down_proj.weight")
        heads = int(o_proj[1]) // head_dim if o_proj else 0
        kv = (int(qkv[0]) // head_dim - heads) // 2 if qkv else 0
        return LayerGeometry(heads, kv, head_dim, int(down[1]) if down else 0)

    def report_fields(self, module: str, count: int, geometry: LayerGeometry) -> dict[str, int]:
        field = module.rpartition(".")[2]
        if field == "qkv_proj":
            hd = geometry.head_dim
            rows = (geometry.num_heads + 2 * geometry.num_kv_heads) * hd
            per_row = count // rows if rows else 0
            kv = geometry.num_kv_heads * hd * per_row
            return {"q_proj": geometry.num_heads * hd * per_row, "k_proj": kv, "v_proj": kv}
        if field == "gate_up_proj":
            return {"gate_proj": count // 2, "up_proj": count // 2}
        return super().report_fields(module, count, geometry)

    def resized(self, layer: Any, kind: str, geometry: LayerGeometry) -> None:
        super().resized(layer, kind, geometry)
        if kind == ATTENTION:
            attn = layer.get_submodule(self.blocks[ATTENTION])
            base = attn.config.__dict__.get("_base", attn.config)
            attn.config = LayerConfig(
                base, num_attention_heads=geometry.num_heads, num_key_value_heads=geometry.num_kv_heads
            )
            attn.num_key_value_heads = geometry.num_kv_heads
            attn.num_key_value_groups = geometry.group_size
