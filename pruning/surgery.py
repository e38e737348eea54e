"""Physical removal of KV groups and MLP channels.

Which rows and columns a structure owns is the family adapter's declaration (``OwnedSlice``s, see
``pruning.families.base``); this module only slices what it is told, so removal, costs and scores
cannot disagree. A fully emptied block becomes its parameter-free stand-in (``ZeroAttention``,
``ZeroMLP``: the ones the checkpoint's shipped modeling code builds, imported from it so there is one
copy) and the norms that served it ``nn.Identity``.

The correctness oracle (tests/oracle.py, docs/families.md): a pruned model computes exactly what the
dense model computes with the same structures zeroed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.families import ATTENTION, KINDS, FamilyAdapter, LayerGeometry, Layout, adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.storage import file_pages

logger = logging.getLogger(__name__)


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
    _release(weight, bias)


def _prune_in(linear: nn.Linear, remove: Sequence[int]) -> None:
    """Drop input columns; the bias belongs to outputs and stays."""
    weight = linear.weight
    linear.weight = nn.Parameter(_keep(weight, 1, remove), requires_grad=weight.requires_grad)
    linear.in_features = linear.weight.shape[1]
    _release(weight)


def _release(*replaced: torch.Tensor | None) -> None:
    """The replaced weights' file pages may go (see pruning.storage.file_pages): without this the mapped file
    stays resident beside the pruned copies."""
    for tensor in replaced:
        if tensor is not None and not tensor.is_meta:
            file_pages.release(tensor.detach())


# ---------------------------------------------------------------------------------------------- checks


def check_plan(
    model: nn.Module, plan: PruningPlan
) -> tuple[FamilyAdapter, int, list[tuple[nn.Module, LayerPlan, LayerGeometry]]]:
    """Pair each decoder layer with its plan, or raise ValueError when the plan was made for other shapes."""
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    layers = adapter.decoder_layers(model)
    if len(plan.layers) != len(layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, the model has {len(layers)}")
    paired = []
    for idx, (layer, lp) in enumerate(zip(layers, plan.layers, strict=True)):
        geo = adapter.geometry(layer, head_dim)
        _check_layer(idx, lp, geo)
        paired.append((layer, lp, geo))
    return adapter, head_dim, paired


def _check_layer(idx: int, lp: LayerPlan, geo: LayerGeometry) -> None:
    if lp.layer_idx != idx:
        raise ValueError(f"plan entry {idx} is for layer {lp.layer_idx}")
    if lp.num_kv_groups != geo.num_kv_heads or lp.num_channels != geo.intermediate_size:
        raise ValueError(
            f"layer {idx}: plan expects {lp.num_kv_groups} KV groups and {lp.num_channels} MLP channels, "
            f"the model has {geo.num_kv_heads} and {geo.intermediate_size} (was it pruned already?)"
        )
    if geo.num_kv_heads and geo.num_heads % geo.num_kv_heads:
        raise ValueError(f"layer {idx}: {geo.num_heads} query heads do not split into {geo.num_kv_heads}")


def removed_by(lp: LayerPlan, kind: str) -> tuple[Sequence[int], bool]:
    """(structures of ``kind`` the plan removes, whether that empties the block)."""
    if kind == ATTENTION:
        return lp.remove_kv_groups, lp.attention_removed
    return lp.remove_channels, lp.mlp_removed


def remove_block(adapter: FamilyAdapter, layer: nn.Module, kind: str, layer_idx: int, head_dim: int) -> None:
    """Replace an emptied block by its parameter-free stand-in and the norms that served it by Identity."""
    zero = ZeroAttention(layer_idx, head_dim) if kind == ATTENTION else ZeroMLP()
    layer.set_submodule(adapter.blocks[kind], zero)
    for path in adapter.block_norms(kind):
        layer.set_submodule(path, nn.Identity())


def _after_removal(geo: LayerGeometry, kind: str, removed: int) -> LayerGeometry:
    if kind == ATTENTION:
        kv = geo.num_kv_heads - removed
        return LayerGeometry(kv * geo.group_size, kv, geo.head_dim, geo.intermediate_size)
    return LayerGeometry(geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.intermediate_size - removed)


def _remove_structures(
    adapter: FamilyAdapter, layer: nn.Module, idx: int, head_dim: int, geo: LayerGeometry, lp: LayerPlan
) -> None:
    """Slice one layer to the plan, block by block (used on real weights and on meta skeletons)."""
    for kind in KINDS:
        structures, emptied = removed_by(lp, kind)
        if emptied:
            remove_block(adapter, layer, kind, idx, head_dim)
        elif structures:
            for owned in adapter.owned_slices(kind, geo):
                linear = layer.get_submodule(owned.path)
                (_prune_out if owned.axis == 0 else _prune_in)(linear, owned.indices(structures))
            geo = _after_removal(geo, kind, len(structures))
            adapter.resized(layer, kind, geo)


# ---------------------------------------------------------------------------------------------- public


def apply_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Remove the plan's KV groups and MLP channels from ``model`` in place.

    Fully emptied blocks become ZeroAttention / ZeroMLP and the norms serving them ``nn.Identity``,
    because nothing else reads them. Embeddings (tied or not) are never touched.
    """
    adapter, head_dim, paired = check_plan(model, plan)
    for layer, lp, geo in paired:
        _remove_structures(adapter, layer, lp.layer_idx, head_dim, geo, lp)
        if not lp.is_empty:
            logger.debug(
                "layer %d: removed %d KV groups, %d MLP channels",
                lp.layer_idx,
                len(lp.remove_kv_groups),
                len(lp.remove_channels),
            )


def apply_layer_plan(model: nn.Module, layer_plan: LayerPlan) -> None:
    """Remove one layer's planned structures: a layer-by-layer pass prunes each layer as it reaches it
    (``pruning.calibration.engine.run_layerwise``'s ``change``), so later layers calibrate on pruned
    inputs."""
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    idx = layer_plan.layer_idx
    layer = adapter.decoder_layers(model)[idx]
    geo = adapter.geometry(layer, head_dim)
    _check_layer(idx, layer_plan, geo)
    _remove_structures(adapter, layer, idx, head_dim, geo, layer_plan)


def pruned_layout(model: nn.Module) -> Layout:
    """Per-layer sizes for ``config.json`` (key ``pruning_layout``), read from the weights.

    0 means the block was removed (Zero* module, its norms nn.Identity). ``head_dim`` and the GQA ratio
    are those of the unchanged top-level config.
    """
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    return Layout.of(adapter.geometry(layer, head_dim).sizes for layer in adapter.decoder_layers(model))


def resize_to_layout(model: nn.Module, layout: Layout) -> None:
    """Shrink a dense (meta) model to ``layout`` by removing each layer's trailing structures.

    The same slicing as ``apply_plan``, so a reloaded checkpoint has exactly the modules surgery made.
    Raises ValueError for a layer the dense model cannot shrink to (more structures, another GQA ratio).
    """
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    layers = adapter.decoder_layers(model)
    for idx, (layer, sizes) in enumerate(zip(layers, layout, strict=True)):
        geo = adapter.geometry(layer, head_dim)
        keep_kv, keep_channels = sizes.num_kv_heads, sizes.intermediate_size
        if (
            keep_kv > geo.num_kv_heads
            or keep_channels > geo.intermediate_size
            or (keep_kv and sizes.num_heads != keep_kv * geo.group_size)
        ):
            raise ValueError(
                f"layer {idx}: {sizes.num_heads} heads, {keep_kv} KV heads and {keep_channels} channels "
                f"cannot come from a layer of {geo.num_heads}, {geo.num_kv_heads} and {geo.intermediate_size}"
            )
        lp = LayerPlan(
            idx,
            geo.num_kv_heads,
            geo.intermediate_size,
            tuple(range(keep_kv, geo.num_kv_heads)),
            tuple(range(keep_channels, geo.intermediate_size)),
        )
        _remove_structures(adapter, layer, idx, head_dim, geo, lp)
