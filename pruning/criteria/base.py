"""What every importance criterion is, and the per-structure scoring they share.

Every criterion reduces to a per-weight importance for the Linears whose entries structures own (the
family adapter's ``OwnedSlice``s, fused projections included); ``layer_structure_scores`` sums that
importance over the entries each structure owns, once for all criteria, so a structure's score scales
with its size and the planner can divide by its parameter cost. Scores go out as ``StructureScores``;
the planner never sees a criterion.

Criteria, measured on SmolLM2-135M (docs/quality.md): magnitude alone is useless; activation-weighted
scores are far better; how they read families with post-norms is in docs/families.md. Statistics come
from the calibration engine's observers (``pruning.calibration.observers``), which keep a few vectors
per module, never activations, and can watch one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from pruning.calibration.engine import LayerStore, each_layer
from pruning.families import KINDS, FamilyAdapter, OwnedSlice, adapter_for
from pruning.planning.scores import StructureScores

# Per-weight importance of one Linear: shaped like its weight, and like its bias (None without bias).
Importance = tuple[torch.Tensor, torch.Tensor | None]
# (layer index, the entries structures own in it, the Linear) -> Importance, or None to ignore that Linear
WeightImportance = Callable[[int, OwnedSlice, nn.Linear], Importance | None]


class Criterion:
    """An importance criterion: its facts, declared beside it as class attributes, and ``score``.

    Subclasses are dataclasses whose fields are their options, typed and with defaults; the registry
    (``pruning.criteria.registry``) builds one with the options of a run that it declares. The pipeline,
    the config checks and ``--dry-run`` ask these facts, never a criterion's name.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True  # False: scores from weights alone, no calibration windows
    needs_backward: ClassVar[bool] = False  # True: a backward through the model (the loss is global)
    needs_whole_model: ClassVar[bool] = False  # True: every weight in memory at once (never streamed)

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        """One score per KV group and per MLP channel of every decoder layer."""
        raise NotImplementedError


def owned_linears(
    adapter: FamilyAdapter, layer: nn.Module, head_dim: int
) -> list[tuple[OwnedSlice, nn.Linear]]:
    """Every Linear whose entries the layer's structures own, with its declaration (none of a Zero* block)."""
    geometry = adapter.geometry(layer, head_dim)
    return [
        (owned, layer.get_submodule(owned.path))
        for kind in KINDS
        if geometry.count(kind)
        for owned in adapter.owned_slices(kind, geometry)
    ]


def layer_structure_scores(
    adapter: FamilyAdapter, layer: nn.Module, layer_idx: int, head_dim: int, importance: WeightImportance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-weight importance over each KV group and each MLP channel of one layer.

    Rows (with their bias entries) or columns are first summed per entry along the owned axis, then per
    structure over its segments. Only one Linear's importance tensor is alive at a time.
    """
    geometry = adapter.geometry(layer, head_dim)
    if geometry.num_kv_heads and geometry.num_heads % geometry.num_kv_heads:
        raise ValueError(
            f"layer {layer_idx}: {geometry.num_heads} query heads do not split into "
            f"{geometry.num_kv_heads} KV groups"
        )
    scores = []
    for kind in KINDS:
        count = geometry.count(kind)
        total = torch.zeros(count, dtype=torch.float32)
        for owned in adapter.owned_slices(kind, geometry) if count else ():
            linear = layer.get_submodule(owned.path)
            result = importance(layer_idx, owned, linear)
            if result is None:
                continue
            weight_imp, bias_imp = result
            if owned.axis == 0:
                per_entry = weight_imp.float().sum(dim=1)
                if bias_imp is not None:
                    per_entry = per_entry + bias_imp.float()
            else:
                per_entry = weight_imp.float().sum(dim=0)
            for seg in owned.segments:
                part = per_entry[seg.offset : seg.offset + count * seg.width]
                total += part.reshape(count, seg.width).sum(dim=1).cpu()
            del weight_imp, bias_imp, per_entry
        scores.append(total)
    return scores[0], scores[1]


def score_layers(
    model: nn.Module,
    importance: WeightImportance,
    common_scale: bool = False,
    store: LayerStore | None = None,
) -> StructureScores:
    """``layer_structure_scores`` for every decoder layer of the model (each holding its weights only
    while it is scored, when ``store`` streams them)."""
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    attention, mlp = [], []
    for idx, layer, _ in each_layer(model, store, desc="scoring"):
        a, m = layer_structure_scores(adapter, layer, idx, head_dim, importance)
        attention.append(a)
        mlp.append(m)
    return StructureScores(attention=attention, mlp=mlp, common_scale=common_scale)


def layers_in_order(
    attention: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor], num_layers: int
) -> StructureScores:
    """Per-layer scores an observer gathered as layers finished, in layer order, on one common scale."""
    missing = [i for i in range(num_layers) if i not in attention]
    if missing:
        raise RuntimeError(f"layers {missing} were never calibrated")
    order = range(num_layers)
    return StructureScores([attention[i] for i in order], [mlp[i] for i in order], common_scale=True)
