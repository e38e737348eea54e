"""Physical removal of KV groups and MLP channels, and its oracle counterpart (zeroing in place).

A KV group ``g`` of a layer is KV head ``g`` (rows ``g*hd:(g+1)*hd`` of ``k_proj``/``v_proj``) with the
``G = num_heads // num_kv_heads`` query heads that share it (query heads ``g*G .. (g+1)*G-1``: their
``q_proj`` rows and ``o_proj`` input columns). Removing whole groups keeps the GQA ratio, so the stock
attention code (which reshapes with ``-1`` heads and repeats KV heads ``num_key_value_groups`` times) runs
unchanged. An MLP channel ``c`` is row ``c`` of ``gate_proj``/``up_proj`` and column ``c`` of ``down_proj``.

``apply_plan`` and ``zero_plan_structures`` must describe the same function: the tests compare a pruned
model with a zeroed copy of the dense one (the correctness oracle of docs/DESIGN.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruning.analysis.shape_rules import LAYOUT_VERSION
from pruning.architectures import decoder_layers, head_dim_of, layer_geometry
from pruning.modules import ZeroAttention, ZeroMLP
from pruning.plan import LayerPlan, PruningPlan

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- indices


def _head_rows(heads: Sequence[int], head_dim: int) -> list[int]:
    """Row (or column) indices of whole heads in a projection laid out head after head."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _group_indices(groups: Sequence[int], group_size: int, head_dim: int) -> tuple[list[int], list[int]]:
    """(query-side indices, kv-side indices) of the given KV groups."""
    query_heads = [g * group_size + j for g in groups for j in range(group_size)]
    return _head_rows(query_heads, head_dim), _head_rows(groups, head_dim)


# ---------------------------------------------------------------------------------------------- slicing


def _keep(tensor: torch.Tensor, dim: int, remove: Sequence[int]) -> torch.Tensor:
    removed = set(remove)
    keep = [i for i in range(tensor.shape[dim]) if i not in removed]
    index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
    return tensor.detach().index_select(dim, index).contiguous()


def _prune_out(linear: nn.Linear, remove: Sequence[int]) -> None:
    """Drop output rows (and bias entries). Own index_select rather than torch-pruning's, which
    always makes the new Parameter trainable; this keeps ``requires_grad`` as it was."""
    weight, bias = linear.weight, linear.bias
    linear.weight = nn.Parameter(_keep(weight, 0, remove), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(_keep(bias, 0, remove), requires_grad=bias.requires_grad)
    linear.out_features = linear.weight.shape[0]


def _prune_in(linear: nn.Linear, remove: Sequence[int]) -> None:
    """Drop input columns; the bias belongs to outputs and stays."""
    weight = linear.weight
    linear.weight = nn.Parameter(_keep(weight, 1, remove), requires_grad=weight.requires_grad)
    linear.in_features = linear.weight.shape[1]


@torch.no_grad()
def _zero_out(linear: nn.Linear, rows: Sequence[int]) -> None:
    if rows:
        index = torch.tensor(list(rows), dtype=torch.long, device=linear.weight.device)
        linear.weight.index_fill_(0, index, 0.0)
        if linear.bias is not None:
            linear.bias.index_fill_(0, index, 0.0)


@torch.no_grad()
def _zero_in(linear: nn.Linear, cols: Sequence[int]) -> None:
    if cols:
        index = torch.tensor(list(cols), dtype=torch.long, device=linear.weight.device)
        linear.weight.index_fill_(1, index, 0.0)


# ---------------------------------------------------------------------------------------------- checks


def _check_plan(model: nn.Module, plan: PruningPlan) -> list[tuple[nn.Module, LayerPlan]]:
    """Pair each decoder layer with its plan, or raise ValueError when the plan was made for other shapes."""
    layers = decoder_layers(model)
    if len(plan.layers) != len(layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, the model has {len(layers)}")
    head_dim = head_dim_of(model.config)
    for idx, (layer, lp) in enumerate(zip(layers, plan.layers, strict=True)):
        geo = layer_geometry(layer, head_dim)
        if lp.layer_idx != idx:
            raise ValueError(f"plan entry {idx} is for layer {lp.layer_idx}")
        if lp.num_kv_groups != geo.num_kv_heads or lp.num_channels != geo.intermediate_size:
            raise ValueError(
                f"layer {idx}: plan expects {lp.num_kv_groups} KV groups and {lp.num_channels} MLP channels, "
                f"the model has {geo.num_kv_heads} and {geo.intermediate_size} (was it pruned already?)"
            )
        if geo.num_kv_heads and geo.num_heads % geo.num_kv_heads:
            raise ValueError(f"layer {idx}: {geo.num_heads} query heads do not split into {geo.num_kv_heads}")
    return list(zip(layers, plan.layers, strict=True))


def _group_size(layer: nn.Module, head_dim: int) -> int:
    return layer_geometry(layer, head_dim).group_size


# ---------------------------------------------------------------------------------------------- public


def apply_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Remove the plan's KV groups and MLP channels from ``model`` in place.

    Fully emptied blocks become ZeroAttention / ZeroMLP, and the RMSNorm feeding them becomes
    ``nn.Identity`` because nothing else reads it. Embeddings (tied or not) are never touched.
    """
    head_dim = head_dim_of(model.config)
    for layer, lp in _check_plan(model, plan):
        attn, mlp = layer.self_attn, layer.mlp
        if lp.attention_removed:
            layer.self_attn = ZeroAttention(lp.layer_idx, head_dim)
            layer.input_layernorm = nn.Identity()
        elif lp.remove_kv_groups:
            q_idx, kv_idx = _group_indices(lp.remove_kv_groups, _group_size(layer, head_dim), head_dim)
            _prune_out(attn.q_proj, q_idx)
            _prune_out(attn.k_proj, kv_idx)
            _prune_out(attn.v_proj, kv_idx)
            _prune_in(attn.o_proj, q_idx)
        if lp.mlp_removed:
            layer.mlp = ZeroMLP()
            layer.post_attention_layernorm = nn.Identity()
        elif lp.remove_channels:
            _prune_out(mlp.gate_proj, lp.remove_channels)
            _prune_out(mlp.up_proj, lp.remove_channels)
            _prune_in(mlp.down_proj, lp.remove_channels)
            if hasattr(mlp, "intermediate_size"):  # informational only; forward never reads it
                mlp.intermediate_size = mlp.gate_proj.out_features
        if not lp.is_empty:
            logger.debug(
                "layer %d: removed %d KV groups, %d MLP channels",
                lp.layer_idx,
                len(lp.remove_kv_groups),
                len(lp.remove_channels),
            )


def zero_plan_structures(model: nn.Module, plan: PruningPlan) -> None:
    """Zero, in place and without changing shapes, exactly what ``apply_plan`` would remove.

    Zeroed q/k/v rows and o columns make a head contribute nothing; zeroed gate/up rows make a channel
    output act(0)*0 = 0. For a fully removed block the output bias is zeroed too, so the block outputs
    exactly 0 like its Zero* replacement (its norm then has no effect, so it is left alone).
    """
    head_dim = head_dim_of(model.config)
    for layer, lp in _check_plan(model, plan):
        attn, mlp = layer.self_attn, layer.mlp
        if lp.remove_kv_groups:
            q_idx, kv_idx = _group_indices(lp.remove_kv_groups, _group_size(layer, head_dim), head_dim)
            _zero_out(attn.q_proj, q_idx)
            _zero_out(attn.k_proj, kv_idx)
            _zero_out(attn.v_proj, kv_idx)
            _zero_in(attn.o_proj, q_idx)
            if lp.attention_removed and attn.o_proj.bias is not None:
                with torch.no_grad():
                    attn.o_proj.bias.zero_()
        if lp.remove_channels:
            _zero_out(mlp.gate_proj, lp.remove_channels)
            _zero_out(mlp.up_proj, lp.remove_channels)
            _zero_in(mlp.down_proj, lp.remove_channels)
            if lp.mlp_removed and mlp.down_proj.bias is not None:
                with torch.no_grad():
                    mlp.down_proj.bias.zero_()


def pruned_layout(model: nn.Module) -> dict[str, Any]:
    """Per-layer sizes for ``config.json`` (key ``pruning_layout``), read from the weights.

    One entry per layer; 0 means the block was removed (Zero* module) and its input norm is nn.Identity.
    ``head_dim`` and the GQA ratio are those of the unchanged top-level config.
    """
    head_dim = head_dim_of(model.config)
    geos = [layer_geometry(layer, head_dim) for layer in decoder_layers(model)]
    return {
        "version": LAYOUT_VERSION,
        "num_attention_heads": [g.num_heads for g in geos],
        "num_key_value_heads": [g.num_kv_heads for g in geos],
        "intermediate_size": [g.intermediate_size for g in geos],
    }
