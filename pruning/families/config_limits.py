"""The limits a family's ``config.json`` must meet before anything is counted or built from it.

``shape_rules.check_config_values`` makes the sizes positive integers, the depth at most ``MAX_LAYERS``
and the layout parseable; ``check_model_config`` adds what makes the sizes usable: each at most
``MAX_SIZE``, KV heads that divide the heads, every layer of the layout one surgery can cut from the
dense layer (``Layout.check_within``), and a head width of at least one. The analysis and
``load_pruned_model`` both call it, so a checkpoint one of them refuses the other refuses too, with
the same words. Without it the loader met these values first in transformers' and torch's own code: a
``ZeroDivisionError`` for 0 KV heads, a ``TypeError`` for ``"4096"``, a petabyte allocation for an
absurd vocabulary. Torch-free, like the rest of the config-only checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pruning.families import adapter_for
from pruning.families.layout import layout_in
from pruning.families.shape_rules import check_config_values

# 64 times the widest dimension of any published decoder (vocabularies of 262,144): room for what comes
# next, while every count and shape computed from the config stays a plain number, never a runaway one.
MAX_SIZE = 2**24
_BOUNDED_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "head_dim")


def check_model_config(config: Mapping[str, Any]) -> None:
    """Every size the family's shapes are computed from is usable; raises ValueError naming the key.

    The caller names the file. ``config`` must be of a family with an adapter (``adapter_for``).
    """
    check_config_values(config)
    for key in _BOUNDED_KEYS:
        value = config.get(key)
        if value is not None and value > MAX_SIZE:
            raise ValueError(f"key {key!r} is {value:,}; at most {MAX_SIZE:,}")
    adapter = adapter_for(config)
    dense = adapter.dense_sizes(config)
    if dense.num_heads % dense.num_kv_heads:
        raise ValueError(
            f"key 'num_key_value_heads' is {dense.num_kv_heads}, which does not divide the "
            f"{dense.num_heads} attention heads into KV groups of equal size"
        )
    layout = layout_in(config)
    if layout is not None:
        layout.check_within(dense)
    if adapter.head_dim(config) < 1:
        raise ValueError(
            f"key 'head_dim' is absent, and hidden_size {config['hidden_size']} divided among "
            f"{dense.num_heads} attention heads leaves no width per head"
        )
