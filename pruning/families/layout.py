"""``pruning_layout``: the per-layer sizes a pruned checkpoint's ``config.json`` adds to the stock config.

A pruned layer has its own head count and intermediate size, which a stock config cannot express, so
the top-level values stay those of the dense model and this entry lists, per layer, what is left (0:
the block was removed, with the norms that served it). ``Layout.parse`` is the only reader; everything
that meets a layout (checkpoint loading, config-only analysis, safetensors checks) goes through it.
A checkpoint whose layers differ also names its own ``model_type``, ``pruned_<stock type>``, so that
transformers asks for ``trust_remote_code`` and runs the modeling code shipped with it
(docs/checkpoint-format.md); ``stock_model_type`` is how this package reads the family back.
Torch-free, so config-only analysis stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LAYOUT_KEY = "pruning_layout"
LAYOUT_VERSION = 1
MAX_LAYERS = 10_000  # the deepest published LLMs have a few hundred; keeps per-layer lists finite
PRUNED_TYPE_PREFIX = "pruned_"  # model_type of a checkpoint with a layout: pruned_llama, pruned_qwen3, ...


@dataclass(frozen=True)
class LayerSizes:
    """What one decoder layer has (0 for a removed block)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class Layout:
    """Per-layer sizes, one entry per decoder layer."""

    num_attention_heads: tuple[int, ...]
    num_key_value_heads: tuple[int, ...]
    intermediate_size: tuple[int, ...]

    @classmethod
    def parse(cls, data: Any, num_layers: int) -> Layout:
        """The one parser: per-layer lists a model of ``num_layers`` layers can take.

        Raises ValueError naming what is wrong; callers add which file it came from.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{LAYOUT_KEY} must be an object, got {type(data).__name__}")
        if num_layers > MAX_LAYERS:  # what every reader of a depth enforces; a layout is per layer
            raise ValueError(f"{LAYOUT_KEY}: {num_layers:,} layers; at most {MAX_LAYERS:,}")
        version = data.get("version")
        if type(version) is not int or version != LAYOUT_VERSION:  # true == 1 and 1.0 == 1 in Python
            raise ValueError(f"{LAYOUT_KEY}: unsupported version {version!r} (expected {LAYOUT_VERSION})")
        lists = []
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            values = data.get(key)
            if (
                not isinstance(values, list)
                or len(values) != num_layers
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
            ):
                raise ValueError(f"{LAYOUT_KEY}.{key} must be a list of {num_layers} non-negative integers")
            lists.append(tuple(values))
        layout = cls(*lists)
        for i, sizes in enumerate(layout):
            heads, kv = sizes.num_heads, sizes.num_kv_heads
            if (heads == 0) != (kv == 0) or (kv and heads % kv):
                raise ValueError(f"{LAYOUT_KEY}: layer {i} has {heads} query heads for {kv} KV heads")
        return layout

    def check_within(self, dense: LayerSizes) -> None:
        """Every layer can be cut from a dense layer of ``dense`` sizes: no more KV heads or channels, and
        whole KV groups (heads = KV heads x the dense group size), as surgery removes them. Bounded by
        the dense sizes, no layer asks for more than the config's own limits allow.

        Raises ValueError naming the layer.
        """
        group = dense.num_heads // dense.num_kv_heads
        for i, sizes in enumerate(self):
            if (
                sizes.num_kv_heads > dense.num_kv_heads
                or sizes.intermediate_size > dense.intermediate_size
                or sizes.num_heads != sizes.num_kv_heads * group
            ):
                raise ValueError(
                    f"{LAYOUT_KEY}: layer {i}: {sizes.num_heads} heads, {sizes.num_kv_heads} KV heads and "
                    f"{sizes.intermediate_size} channels cannot come from a layer of {dense.num_heads}, "
                    f"{dense.num_kv_heads} and {dense.intermediate_size}"
                )

    @classmethod
    def of(cls, layers: Iterable[LayerSizes]) -> Layout:
        sizes = list(layers)
        return cls(
            tuple(s.num_heads for s in sizes),
            tuple(s.num_kv_heads for s in sizes),
            tuple(s.intermediate_size for s in sizes),
        )

    def __len__(self) -> int:
        return len(self.num_attention_heads)

    def __iter__(self):
        for heads, kv, inter in zip(
            self.num_attention_heads, self.num_key_value_heads, self.intermediate_size, strict=True
        ):
            yield LayerSizes(heads, kv, inter)

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` entry (lists, so that it equals what ``json.load`` gives back)."""
        return {
            "version": LAYOUT_VERSION,
            "num_attention_heads": list(self.num_attention_heads),
            "num_key_value_heads": list(self.num_key_value_heads),
            "intermediate_size": list(self.intermediate_size),
        }


def layout_in(config: Mapping[str, Any]) -> Layout | None:
    """The config's layout, parsed against its ``num_hidden_layers`` (None for an unpruned model)."""
    data = config.get(LAYOUT_KEY)
    if not data:
        return None
    return Layout.parse(data, int(config["num_hidden_layers"]))


def stock_model_type(model_type: Any) -> Any:
    """The transformers model_type a pruned checkpoint's type stands for (``pruned_llama`` -> ``llama``);
    any other value unchanged. The family, its adapter and its stock classes are those of this type."""
    if isinstance(model_type, str) and model_type.startswith(PRUNED_TYPE_PREFIX):
        return model_type[len(PRUNED_TYPE_PREFIX) :]
    return model_type
