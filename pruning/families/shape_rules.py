"""What ``config.json`` alone says about a model's tensors: its values checked, and stored shapes compared.

The shapes themselves are the adapters' (``FamilyAdapter.parameter_shapes``): building a model on the
meta device gives the same shapes but costs seconds of imports (torch and transformers); the rules
cost microseconds, and ``tests/test_shape_rules.py`` proves both agree for every family. The source
check before a run and the analysis of a checkpoint both use these. A ``pruning_layout`` is honoured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pruning.families import adapter_for
from pruning.families.layout import LAYOUT_KEY, MAX_LAYERS, Layout

_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
_OPTIONAL_SIZE_KEYS = ("head_dim", "num_key_value_heads")


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
        Layout.parse(config[LAYOUT_KEY], config["num_hidden_layers"])


@dataclass(frozen=True)
class StoredVsConfig:
    """How stored tensor shapes differ from what ``config.json`` implies (names sorted)."""

    missing: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, stored, expected)
    unexpected: list[str]


def compare_to_config(config: Mapping[str, Any], stored: Mapping[str, tuple[int, ...]]) -> StoredVsConfig:
    """Stored shapes against the config's; extras transformers ignores by design (a tied lm_head's
    copy, old rotary buffers) are not counted as unexpected."""
    adapter = adapter_for(config)
    expected = adapter.parameter_shapes(config)
    tied = adapter.tied_embeddings(config)
    return StoredVsConfig(
        missing=sorted(set(expected) - set(stored)),
        mismatched=[(n, stored[n], s) for n, s in sorted(expected.items()) if n in stored and stored[n] != s],
        unexpected=sorted(
            n
            for n in set(stored) - set(expected)
            if not (n == adapter.lm_head and tied) and not n.endswith(adapter.ignored_stored)
        ),
    )


def first_of(names: list[str]) -> str:
    """``a`` or ``a and 3 more``: one name for a one-line error."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
