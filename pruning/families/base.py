"""The one interface the package asks about a model family: what a decoder layer holds, who owns what.

Scoring, costs, surgery, checkpoints and analysis hold no family knowledge; they ask an adapter. A
family is one module with one ``FamilyAdapter`` subclass (docs/families.md, "Adding a model family").

Every family has two kinds of prunable structure:

- ``attention``: KV group ``g`` = KV head ``g`` and the ``G = heads / kv_heads`` query heads that share
  it (query heads ``g*G .. g*G+G-1``, because transformers' ``repeat_kv`` gives query head ``h`` the KV
  head ``h // G``). Removing whole groups keeps the GQA ratio, so stock attention code runs unchanged.
- ``mlp``: channel ``c`` = one intermediate unit (a row of the up/gate projections, a column of down).

Which weights a structure owns is declared as ``OwnedSlice``s: a Linear, an axis (0: output rows with
their bias entries, 1: input columns) and segments, so a fused projection (Phi-3's ``qkv_proj``) is
one Linear with several segments. Costs, scores, removal and zeroing are computed from these
declarations alone, so they cannot disagree with each other.

Torch is imported only inside methods that touch live modules: the config-only analysis path stays
fast (importing torch costs about 3 s).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from pruning.families.layout import LayerSizes, layout_in
from pruning.storage.weight_files import numel

if TYPE_CHECKING:
    from torch import Tensor, nn

ATTENTION = "attention"
MLP = "mlp"
KINDS = (ATTENTION, MLP)

# Per-projection fields of the analysis report (model_analysis.schema.json). A family whose weights are
# fused or named otherwise maps its parameters onto these in ``report_fields``.
REPORT_ATTENTION_FIELDS = ("q_proj", "k_proj", "v_proj", "o_proj")
REPORT_MLP_FIELDS = ("gate_proj", "up_proj", "down_proj")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Segment:
    """Structure ``s`` owns entries ``offset + s*width .. offset + (s+1)*width - 1`` of an axis."""

    offset: int
    width: int


@dataclass(frozen=True)
class OwnedSlice:
    """The entries of one Linear (``path`` inside the decoder layer) that structures of one kind own."""

    path: str
    axis: int  # 0: output rows and their bias entries; 1: input columns (the bias is not owned)
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        """Entries one structure owns along the axis."""
        return sum(seg.width for seg in self.segments)

    def indices(self, structures: Sequence[int]) -> list[int]:
        """Entries along the axis that the given structures own."""
        return [
            seg.offset + s * seg.width + j
            for seg in self.segments
            for s in structures
            for j in range(seg.width)
        ]

    def cost(self, shapes: Shapes) -> int:
        """Parameters one structure owns in this Linear (weight entries, plus bias entries on axis 0)."""
        out_features, in_features = shapes[f"{self.path}.weight"]
        if self.axis == 0:
            return self.width * (in_features + (1 if f"{self.path}.bias" in shapes else 0))
        return self.width * out_features


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of one decoder layer as its weights have them (0 for a removed block)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio); removing one KV group removes this many query heads."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    def count(self, kind: str) -> int:
        """How many structures of ``kind`` the layer has."""
        return self.num_kv_heads if kind == ATTENTION else self.intermediate_size

    @property
    def sizes(self) -> LayerSizes:
        return LayerSizes(self.num_heads, self.num_kv_heads, self.intermediate_size)


@dataclass(frozen=True)
class LayerCosts:
    """Parameters freed by removing one structure of each kind, and by emptying each block."""

    geometry: LayerGeometry
    kv_group_cost: int
    channel_cost: int
    # What goes only with the block's last structure: its unowned parameters (an output bias, per-head
    # q/k norms) and the norms that served the block (surgery replaces them by Identity).
    attention_block_cost: int = 0
    mlp_block_cost: int = 0

    @property
    def num_kv_groups(self) -> int:
        return self.geometry.num_kv_heads

    @property
    def num_channels(self) -> int:
        return self.geometry.intermediate_size

    def block_cost(self, kind: str) -> int:
        return self.attention_block_cost if kind == ATTENTION else self.mlp_block_cost


class FamilyAdapter:
    """One model family's decoder layer. Subclasses set the class attributes and implement
    ``layer_shapes``, ``owned_slices``, ``geometry_from_shapes`` and ``block_norms``; the rest is
    shared. ``LlamaFamily`` (families/llama.py) is the reference to copy from."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json ``model_type`` values this adapter handles
    class_prefix: ClassVar[str] = ""  # transformers' class names (``Llama`` -> LlamaAttention), for reports
    gguf_arch: ClassVar[str | None] = None  # llama.cpp's ``general.architecture``
    # llama.cpp tensor names inside ``blk.N.`` -> module paths inside the decoder layer
    gguf_names: ClassVar[Mapping[str, str]] = MappingProxyType({})
    # Values transformers' config class gives a key config.json omits (its constructor's defaults)
    config_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    blocks: ClassVar[Mapping[str, str]] = MappingProxyType({ATTENTION: "self_attn", MLP: "mlp"})
    # Top-level parameters as transformers' causal-LM classes name them
    embedding: ClassVar[str] = "model.embed_tokens.weight"
    final_norm: ClassVar[str] = "model.norm.weight"
    lm_head: ClassVar[str] = "lm_head.weight"
    # Stored tensors transformers ignores by design (suffixes): old checkpoints' rotary buffers
    ignored_stored: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    gguf_top_names: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    )
    gguf_buffers: ClassVar[tuple[str, ...]] = ("rope_freqs",)  # llama.cpp tensors transformers computes
    # A norm's scale is ``weight`` (0.0) or ``1 + weight`` (1.0, Gemma)
    norm_gain_offset: ClassVar[float] = 0.0

    # ------------------------------------------------------------------ config.json (torch-free)

    def value(self, config: Any, key: str, default: Any = None) -> Any:
        """A config value from a dict or a config object. A key config.json omits takes the value
        transformers' config class gives it (``config_defaults``); an explicit null takes ``default``."""
        present = key in config if isinstance(config, Mapping) else hasattr(config, key)
        if not present:
            return self.config_defaults.get(key, default)
        found = config[key] if isinstance(config, Mapping) else getattr(config, key)
        return default if found is None else found

    def head_dim(self, config: Any) -> int:
        """Per-head width: ``head_dim`` when the config sets it, else hidden_size / num_attention_heads."""
        explicit = self.value(config, "head_dim")
        if explicit:
            return int(explicit)
        return int(self.value(config, "hidden_size")) // int(self.value(config, "num_attention_heads"))

    def tied_embeddings(self, config: Any) -> bool:
        return bool(self.value(config, "tie_word_embeddings", False))

    def dense_sizes(self, config: Any) -> LayerSizes:
        heads = int(self.value(config, "num_attention_heads"))
        return LayerSizes(
            heads,
            int(self.value(config, "num_key_value_heads") or heads),
            int(self.value(config, "intermediate_size")),
        )

    def layer_sizes(self, config: Mapping[str, Any]) -> list[LayerSizes]:
        """Sizes per layer: the ``pruning_layout`` when present, else the dense sizes everywhere."""
        layout = layout_in(config)
        if layout is not None:
            return list(layout)
        return [self.dense_sizes(config)] * int(config["num_hidden_layers"])

    def parameter_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape, named as transformers names them; a tied lm_head is left out."""
        hidden, vocab = int(self.value(config, "hidden_size")), int(self.value(config, "vocab_size"))
        shapes: dict[str, tuple[int, ...]] = {self.embedding: (vocab, hidden)}
        for i, sizes in enumerate(self.layer_sizes(config)):
            shapes.update(
                {f"model.layers.{i}.{rest}": s for rest, s in self.layer_shapes(config, sizes).items()}
            )
        shapes[self.final_norm] = (hidden,)
        if not self.tied_embeddings(config):
            shapes[self.lm_head] = (vocab, hidden)
        return shapes

    def layer_shapes(self, config: Any, sizes: LayerSizes) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of one decoder layer with these sizes (names relative to the layer)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ structures (torch-free)

    def owned_slices(self, kind: str, geometry: LayerGeometry) -> tuple[OwnedSlice, ...]:
        """Every Linear entry that structures of ``kind`` own, for a layer of this geometry."""
        raise NotImplementedError

    def geometry_from_shapes(self, shapes: Shapes, head_dim: int) -> LayerGeometry:
        """Sizes of a layer from its parameter shapes (names relative to the layer); 0 for a missing block."""
        raise NotImplementedError

    def block_norms(self, kind: str) -> tuple[str, ...]:
        """Norms (paths in the layer) that serve only this block and go when it empties."""
        raise NotImplementedError

    def output_norm(self, kind: str) -> str | None:
        """A norm between the block's output projection and the residual stream (Gemma's post-norms)."""
        return None

    def layer_costs(self, shapes: Shapes, head_dim: int) -> LayerCosts:
        """Parameters each structure owns and each block's leftovers, from the layer's shapes."""
        geometry = self.geometry_from_shapes(shapes, head_dim)
        costs: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for kind in KINDS:
            count = geometry.count(kind)
            per = sum(s.cost(shapes) for s in self.owned_slices(kind, geometry)) if count else 0
            prefix = f"{self.blocks[kind]}."
            in_block = sum(numel(s) for n, s in shapes.items() if n.startswith(prefix))
            norms = sum(numel(s) for n, s in shapes.items() if n.rpartition(".")[0] in self.block_norms(kind))
            costs[kind] = per
            blocks[kind] = in_block - count * per + norms if count else 0
        return LayerCosts(geometry, costs[ATTENTION], costs[MLP], blocks[ATTENTION], blocks[MLP])

    # ------------------------------------------------------------------ analysis report (torch-free)

    def report_fields(self, module: str, count: int, geometry: LayerGeometry) -> dict[str, int]:
        """Split a parameter of ``module`` (a path inside the layer) over the report's projection fields."""
        field = module.rpartition(".")[2]
        return {field: count} if field in (*REPORT_ATTENTION_FIELDS, *REPORT_MLP_FIELDS) else {}

    def top_level_part(self, name: str) -> str:
        """``embedding``, ``lm_head``, ``final_norm`` or ``other`` for a parameter outside the layers."""
        if name.endswith(self.embedding.partition(".")[2]):
            return "embedding"
        if name.startswith(self.lm_head.rpartition(".")[0] + "."):
            return "lm_head"
        return "final_norm" if "norm" in name.rsplit(".", 2)[-2] else "other"

    def is_layer_norm(self, name: str) -> bool:
        """A parameter of a norm directly in the decoder layer (name relative to the layer)."""
        return "norm" in name.partition(".")[0]

    def block_of(self, name: str) -> str | None:
        """``attention`` / ``mlp`` for a parameter inside that block (name relative to the layer)."""
        head = name.partition(".")[0]
        return next((kind for kind, path in self.blocks.items() if path == head), None)

    # ------------------------------------------------------------------ live modules

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM (``model.model.layers``) or of its base model."""
        from torch import nn

        from pruning.errors import UserError

        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise UserError(f"{type(model).__name__} has no decoder layers at model.layers")
        return layers

    def geometry(self, layer: nn.Module, head_dim: int) -> LayerGeometry:
        """Sizes of a live (or meta) decoder layer, read from its weight shapes."""
        return self.geometry_from_shapes(_shapes_of(layer), head_dim)

    def costs(self, layer: nn.Module, head_dim: int) -> LayerCosts:
        return self.layer_costs(_shapes_of(layer), head_dim)

    def resized(self, layer: nn.Module, kind: str, geometry: LayerGeometry) -> None:
        """Bring module attributes that hold sizes in line with the new weights (after surgery)."""
        block = layer.get_submodule(self.blocks[kind])
        if kind == MLP and hasattr(block, "intermediate_size"):  # informational; forward never reads it
            block.intermediate_size = geometry.intermediate_size

    def norm_gain(self, norm: nn.Module) -> Tensor:
        """The per-dimension scale a norm applies after normalising."""
        return norm.weight.detach().float() + self.norm_gain_offset


def _shapes_of(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in layer.named_parameters()}
