"""Llama (2, 3, 3.x): the reference layout most families reuse.

A decoder layer is ``input_layernorm -> self_attn -> + residual -> post_attention_layernorm -> mlp ->
+ residual``, with separate ``q/k/v/o_proj`` and ``gate/up/down_proj`` Linears. ``attention_bias``
adds biases to all four attention projections, ``mlp_bias`` to all three MLP ones.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pruning.families.base import (
    ATTENTION,
    FamilyAdapter,
    LayerGeometry,
    OwnedSlice,
    Segment,
    Shapes,
)
from pruning.families.layout import LayerSizes


class LlamaFamily(FamilyAdapter):
    name = "llama"
    model_types = ("llama",)
    class_prefix = "Llama"
    gguf_arch = "llama"
    gguf_names = MappingProxyType(
        {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
    )

    # -- which bias and norm parameters exist (subclasses override)

    def qkv_bias(self, config: Any) -> bool:
        return bool(self.value(config, "attention_bias", False))

    def o_bias(self, config: Any) -> bool:
        return bool(self.value(config, "attention_bias", False))

    def mlp_bias(self, config: Any) -> bool:
        return bool(self.value(config, "mlp_bias", False))

    def attention_extras(self, config: Any, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Parameters of the attention block besides its projections (Qwen3's per-head q/k norms)."""
        return {}

    # -- interface

    def layer_shapes(self, config: Any, sizes: LayerSizes) -> dict[str, tuple[int, ...]]:
        hidden, hd = int(self.value(config, "hidden_size")), self.head_dim(config)
        shapes: dict[str, tuple[int, ...]] = {}
        if sizes.num_heads:
            q, kv = sizes.num_heads * hd, sizes.num_kv_heads * hd
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"self_attn.{name}.weight"] = (rows, hidden)
                if self.qkv_bias(config):
                    shapes[f"self_attn.{name}.bias"] = (rows,)
            shapes["self_attn.o_proj.weight"] = (hidden, q)
            if self.o_bias(config):
                shapes["self_attn.o_proj.bias"] = (hidden,)
            shapes.update({f"self_attn.{n}": s for n, s in self.attention_extras(config, hd).items()})
        if sizes.intermediate_size:
            inter = sizes.intermediate_size
            for name, shape in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            ):
                shapes[f"mlp.{name}.weight"] = shape
                if self.mlp_bias(config):
                    shapes[f"mlp.{name}.bias"] = (shape[0],)
        for kind in (ATTENTION, "mlp"):
            if sizes.num_heads if kind == ATTENTION else sizes.intermediate_size:
                shapes.update({f"{norm}.weight": (hidden,) for norm in self.block_norms(kind)})
        return shapes

    def owned_slices(self, kind: str, geometry: LayerGeometry) -> tuple[OwnedSlice, ...]:
        if kind == ATTENTION:
            query = Segment(0, geometry.group_size * geometry.head_dim)
            kv = Segment(0, geometry.head_dim)
            return (
                OwnedSlice("self_attn.q_proj", 0, (query,)),
                OwnedSlice("self_attn.k_proj", 0, (kv,)),
                OwnedSlice("self_attn.v_proj", 0, (kv,)),
                OwnedSlice("self_attn.o_proj", 1, (query,)),
            )
        channel = Segment(0, 1)
        return (
            OwnedSlice("mlp.gate_proj", 0, (channel,)),
            OwnedSlice("mlp.up_proj", 0, (channel,)),
            OwnedSlice("mlp.down_proj", 1, (channel,)),
        )

    def geometry_from_shapes(self, shapes: Shapes, head_dim: int) -> LayerGeometry:
        def rows(name: str) -> int:
            shape = shapes.get(f"{name}.weight")
            return int(shape[0]) if shape else 0

        return LayerGeometry(
            num_heads=rows("self_attn.q_proj") // head_dim,
            num_kv_heads=rows("self_attn.k_proj") // head_dim,
            head_dim=head_dim,
            intermediate_size=rows("mlp.gate_proj"),
        )

    def block_norms(self, kind: str) -> tuple[str, ...]:
        return ("input_layernorm",) if kind == ATTENTION else ("post_attention_layernorm",)
