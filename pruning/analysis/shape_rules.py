"""Parameter shapes of the supported families computed from ``config.json`` alone.

Building a model on the meta device gives the same shapes but costs seconds of imports (torch and
transformers); this costs microseconds. ``tests/test_shape_rules.py`` proves both agree for every
family listed here. Other families fall back to the meta build. A ``pruning_layout`` (per-layer heads,
KV heads, intermediate size; 0 = block removed, its norm removed with it) is honoured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# model_type -> (class-name prefix, q/k/v bias default, o bias default, has per-head q/k norms)
FAMILIES: dict[str, tuple[str, bool, bool, bool]] = {
    "llama": ("Llama", False, False, False),
    "mistral": ("Mistral", False, False, False),
    "qwen2": ("Qwen2", True, False, False),
    "qwen3": ("Qwen3", False, False, True),
}


LAYOUT_KEY = "pruning_layout"
LAYOUT_VERSION = 1
LAYOUT_SIZES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
_OPTIONAL_SIZE_KEYS = ("head_dim", "num_key_value_heads")
MAX_LAYERS = 10_000  # the deepest published LLMs have a few hundred


def check_layout(layout: Any, num_layers: int) -> None:
    """The one parser of ``pruning_layout``: per-layer lists that a model of ``num_layers`` can take.

    Raises ValueError naming what is wrong; callers add which file it came from.
    """
    if not isinstance(layout, Mapping):
        raise ValueError(f"{LAYOUT_KEY} must be an object, got {type(layout).__name__}")
    if layout.get("version") != LAYOUT_VERSION:
        version = layout.get("version")
        raise ValueError(f"{LAYOUT_KEY}: unsupported version {version!r} (expected {LAYOUT_VERSION})")
    for key in LAYOUT_SIZES:
        values = layout.get(key)
        if (
            not isinstance(values, list)
            or len(values) != num_layers
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
        ):
            raise ValueError(f"{LAYOUT_KEY}.{key} must be a list of {num_layers} non-negative integers")
    pairs = zip(layout["num_attention_heads"], layout["num_key_value_heads"], strict=True)
    for i, (heads, kv) in enumerate(pairs):
        if (heads == 0) != (kv == 0) or (kv and heads % kv):
            raise ValueError(f"{LAYOUT_KEY}: layer {i} has {heads} query heads for {kv} KV heads")


def check_config_values(config: Mapping[str, Any]) -> None:
    """The values the shape rules read are positive integers and the layout (if any) parses.

    Raises ValueError naming the key.
    """
    for key in (*_SIZE_KEYS, *_OPTIONAL_SIZE_KEYS):
        value = config.get(key)
        optional = key in _OPTIONAL_SIZE_KEYS and value is None
        if not optional and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"key {key!r} must be a positive integer, got {value!r}")
    if config["num_hidden_layers"] > MAX_LAYERS:  # shapes are listed per layer: keep the list finite
        raise ValueError(
            f"key 'num_hidden_layers' is {config['num_hidden_layers']:,}; at most {MAX_LAYERS:,}"
        )
    if config.get(LAYOUT_KEY):
        check_layout(config[LAYOUT_KEY], config["num_hidden_layers"])


@dataclass(frozen=True)
class StoredVsConfig:
    """How stored tensor shapes differ from what ``config.json`` implies (names sorted)."""

    missing: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, stored, expected)
    unexpected: list[str]


def compare_to_config(config: Mapping[str, Any], stored: Mapping[str, tuple[int, ...]]) -> StoredVsConfig:
    """Stored shapes against the config's; extras transformers ignores by design (a tied lm_head's
    copy, old rotary buffers) are not counted as unexpected."""
    expected = shapes_from_config(config)
    tied = bool(config.get("tie_word_embeddings", False))
    return StoredVsConfig(
        missing=sorted(set(expected) - set(stored)),
        mismatched=[(n, stored[n], s) for n, s in sorted(expected.items()) if n in stored and stored[n] != s],
        unexpected=sorted(
            n
            for n in set(stored) - set(expected)
            if not (n == "lm_head.weight" and tied) and not n.endswith("rotary_emb.inv_freq")
        ),
    )


def first_of(names: list[str]) -> str:
    """``a`` or ``a and 3 more``: one name for a one-line error."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def supports(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") in FAMILIES


def head_dim_of(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _qkv_bias(config: Mapping[str, Any], default: bool) -> bool:
    if config.get("model_type") == "qwen2":
        return True
    return bool(config.get("attention_bias", default))


def layer_sizes(config: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """(num_heads, num_kv_heads, intermediate_size) per layer, from the pruning layout when present."""
    n = int(config["num_hidden_layers"])
    layout = config.get("pruning_layout")
    if layout:
        return list(
            zip(
                layout["num_attention_heads"],
                layout["num_key_value_heads"],
                layout["intermediate_size"],
                strict=True,
            )
        )
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    return [(heads, kv, int(config["intermediate_size"]))] * n


def shapes_from_config(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, named as transformers names them; a tied lm_head is left out."""
    _prefix, qkv_default, o_default, qk_norm = FAMILIES[config["model_type"]]
    hidden, hd = int(config["hidden_size"]), head_dim_of(config)
    qkv_bias, o_bias = _qkv_bias(config, qkv_default), bool(config.get("attention_bias", o_default))
    mlp_bias = bool(config.get("mlp_bias", False))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (int(config["vocab_size"]), hidden)}
    for i, (heads, kv, inter) in enumerate(layer_sizes(config)):
        p = f"model.layers.{i}."
        if heads:
            for name, rows, bias in (
                ("q", heads * hd, qkv_bias),
                ("k", kv * hd, qkv_bias),
                ("v", kv * hd, qkv_bias),
            ):
                shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, hidden)
                if bias:
                    shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
            shapes[f"{p}self_attn.o_proj.weight"] = (hidden, heads * hd)
            if o_bias:
                shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
            if qk_norm:
                shapes[f"{p}self_attn.q_norm.weight"] = (hd,)
                shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
            shapes[f"{p}input_layernorm.weight"] = (hidden,)
        if inter:
            for name, shape in (
                ("gate", (inter, hidden)),
                ("up", (inter, hidden)),
                ("down", (hidden, inter)),
            ):
                shapes[f"{p}mlp.{name}_proj.weight"] = shape
                if mlp_bias:
                    shapes[f"{p}mlp.{name}_proj.bias"] = (shape[0],)
            shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (int(config["vocab_size"]), hidden)
    return shapes
