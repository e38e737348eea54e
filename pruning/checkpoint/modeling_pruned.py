"""Modeling code for a checkpoint whose decoder layers were pruned to different sizes.

transformers runs this file when the checkpoint is loaded with ``trust_remote_code=True``::

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

A pruned layer has its own number of attention heads and MLP channels, which a stock config cannot
express. So ``config.json`` keeps the dense model's top-level sizes and lists each layer's sizes under
``pruning_layout``. This file builds the stock model of the family the checkpoint was pruned from
(``BASE_MODEL_TYPE``), then rebuilds each decoder layer with the stock layer class at its own sizes, so
every computation is the stock one. A block with nothing left (0 heads or 0 channels) becomes a
parameter-free stand-in that adds nothing to the residual stream, and the norms that served only it
(``pruning_blocks`` in ``config.json``) become ``nn.Identity``: the state dict is exactly the saved one.

It needs only torch and transformers. It is ``pruning/checkpoint/modeling_pruned.py`` from the
``pruning`` package, copied into the checkpoint with ``BASE_MODEL_TYPE`` set; the package's
docs/checkpoint-format.md describes the format.

Limitation: a static KV cache (``cache_implementation="static"``) is sized from the top-level (dense)
head counts, so it does not fit layers with fewer KV heads; use the default dynamic cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

LAYOUT_VERSION = 1  # the pruning_layout version this file reads (pruning.families.layout.LAYOUT_VERSION)
MODELING_VERSION = f"{LAYOUT_VERSION}.1"  # this file: the layout version it builds, then its own revision
LAYOUT_KEY = "pruning_layout"
BLOCKS_KEY = "pruning_blocks"
PRUNED_TYPE_PREFIX = "pruned_"
BASE_MODEL_TYPE = "llama"  # the stock model_type the checkpoint was pruned from; set when it is saved

_StockConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_StockForCausalLM = MODEL_FOR_CAUSAL_LM_MAPPING[_StockConfig]


# ---------------------------------------------------------------------------------------------- config


class PrunedConfig(_StockConfig):
    """The family's stock config with ``pruning_layout`` and ``pruning_blocks``.

    Its own ``model_type`` (``pruned_<base>``) is one transformers does not know, so that loading
    without ``trust_remote_code`` stops with transformers' message about custom code instead of
    building the dense stock model and failing on the first pruned weight.
    """

    model_type = PRUNED_TYPE_PREFIX + BASE_MODEL_TYPE


class LayerConfig:
    """The model's config with some values overridden for one decoder layer.

    A view, not a copy: everything not overridden is read from the shared config when it is used, so a
    later change to it (``set_attn_implementation``) reaches the layer.
    """

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = overrides

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name.startswith("__") or "_base" not in state:  # copy/pickle probes must not reach the base
            raise AttributeError(name)
        if name in state["_overrides"]:
            return state["_overrides"][name]
        return getattr(state["_base"], name)

    def __repr__(self) -> str:
        return f"LayerConfig({self.__dict__['_overrides']})"


def read_layout(config: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) per layer; ValueError for a layout this file cannot build."""
    data = getattr(config, LAYOUT_KEY, None)
    if (
        not isinstance(data, dict)
        or type(data.get("version")) is not int
        or data["version"] != LAYOUT_VERSION
    ):
        found = data.get("version") if isinstance(data, dict) else data
        raise ValueError(
            f"config.json {LAYOUT_KEY}: version {found!r}; this modeling code (version {MODELING_VERSION}) "
            f"reads version {LAYOUT_VERSION}"
        )
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    columns = [data.get(key) for key in keys]
    for key, values in zip(keys, columns, strict=True):
        if (
            not isinstance(values, list)
            or len(values) != config.num_hidden_layers
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
        ):
            raise ValueError(
                f"config.json {LAYOUT_KEY}.{key} must be a list of {config.num_hidden_layers} "
                "non-negative integers"
            )
    layout = list(zip(*columns, strict=True))
    for idx, (heads, kv_heads, _) in enumerate(layout):
        if (heads == 0) != (kv_heads == 0) or (kv_heads and heads % kv_heads):
            raise ValueError(
                f"config.json {LAYOUT_KEY}: layer {idx} has {heads} heads for {kv_heads} KV heads"
            )
    return layout


def read_blocks(config: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    """For ``attention`` and ``mlp``: the block's module in the layer and the norms that go with it."""
    data = getattr(config, BLOCKS_KEY, None)
    blocks = {}
    for kind in ("attention", "mlp"):
        entry = data.get(kind) if isinstance(data, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("module"), str)
            or not isinstance(entry.get("norms"), list)
            or not all(isinstance(norm, str) for norm in entry["norms"])
        ):
            raise ValueError(
                f'config.json {BLOCKS_KEY}.{kind} must be {{"module": str, "norms": [str, ...]}}'
            )
        blocks[kind] = (entry["module"], tuple(entry["norms"]))
    return blocks


def dense_head_dim(config: Any) -> int:
    """The per-head width every layer keeps (pruning removes whole heads), as stock attention reads it."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ---------------------------------------------------------------------------------------------- stand-ins


class ZeroAttention(nn.Module):
    """An attention block with no heads left: contributes nothing to the residual stream.

    It still writes a placeholder entry (one head of width 1, zeros) into the KV cache, so the cache's
    sequence length stays right when this is layer 0: transformers reads the number of past tokens from
    layer 0's cache. The entry must not be empty: transformers 5's ``DynamicLayer.get_seq_length``
    reports 0 for a cache whose tensors have no elements, which would silently reset positions and masks.
    """

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, seq_len = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros((batch, 1, seq_len, 1))
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, head_dim={self.head_dim}"


class ZeroMLP(nn.Module):
    """An MLP block with no intermediate channels left: returns zeros."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


# ---------------------------------------------------------------------------------------------- model


class PrunedForCausalLM(_StockForCausalLM):
    """The family's stock causal LM with each decoder layer at the sizes ``pruning_layout`` gives it."""

    config_class = PrunedConfig

    def __init__(self, config: PrunedConfig) -> None:
        # The dense stock model first (on the meta device when from_pretrained builds it, so never
        # allocated there), then each layer replaced by one of its own size.
        super().__init__(config)
        layers = getattr(self, self.base_model_prefix).layers
        layout, blocks, head_dim = read_layout(config), read_blocks(config), dense_head_dim(config)
        for idx, sizes in enumerate(layout):
            layers[idx] = _build_layer(type(layers[idx]), config, idx, sizes, head_dim, blocks)
        self.post_init()  # again, for the new layers: initialise (from_config), tie, collect properties

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """``set_attn_implementation`` works: every attention left is the stock one, which reads the
        implementation from the shared config. (transformers guesses from this file's source, finds the
        ``ZeroAttention`` stand-in, which has nothing to implement, and would say no.)"""
        return True


def _build_layer(
    layer_class: type[nn.Module],
    config: PrunedConfig,
    idx: int,
    sizes: tuple[int, int, int],
    head_dim: int,
    blocks: dict[str, tuple[str, tuple[str, ...]]],
) -> nn.Module:
    """The stock layer at these sizes; an emptied block is built at size 1 and replaced at once."""
    heads, kv_heads, channels = sizes
    layer_config = LayerConfig(
        config,
        num_attention_heads=heads or 1,
        num_key_value_heads=kv_heads or 1,
        intermediate_size=channels or 1,
        head_dim=head_dim,  # stock attention would derive hidden_size / num_attention_heads otherwise
    )
    layer = layer_class(layer_config, idx)
    if heads == 0:
        _replace_block(layer, blocks["attention"], ZeroAttention(idx, head_dim))
    if channels == 0:
        _replace_block(layer, blocks["mlp"], ZeroMLP())
    return layer


def _replace_block(layer: nn.Module, block: tuple[str, tuple[str, ...]], stand_in: nn.Module) -> None:
    module, norms = block
    layer.set_submodule(module, stand_in)
    for norm in norms:
        layer.set_submodule(norm, nn.Identity())
