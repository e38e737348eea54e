"""The ``activation`` criterion: the share of the residual stream a structure writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pruning.calibration.engine import Handle, LayerStore, calibrate
from pruning.calibration.observers import RESIDUAL, InputNormCollector
from pruning.criteria.base import Criterion, Importance, layer_structure_scores, layers_in_order
from pruning.families import KINDS, FamilyAdapter, OwnedSlice, adapter_for
from pruning.planning.scores import StructureScores


@dataclass
class ActivationCriterion(Criterion):
    """How much of the residual stream a structure writes, relative to the stream at that layer.

    A structure writes through the input columns it owns of its block's output projection (o_proj for
    a KV group, down_proj for a channel); removing it takes away ``sum_j ||W[:, j]||^2 * E[x_j^2]`` of
    energy (x_j: the column's input over calibration tokens; cross terms ignored). Dividing by the
    residual stream's typical energy at the layer's input makes the score a share of what flows at that
    depth, comparable across layers and between attention and MLP, so one global ranking needs no
    per-type or per-layer rescaling. "Typical" is the median per-dimension energy times the width: a few
    "massive activation" dimensions dominate the stream's norm from the middle layers on and would make
    those layers look cheap.

    Where a norm sits between the output projection and the residual stream (Gemma's post-norms), what
    reaches the stream is ``gain * y / rms(y)`` of the block output ``y``, so output row ``i`` is weighted
    by ``gain_i^2 / E[mean(y^2)]``. This is first order: removing a structure also changes ``rms(y)``,
    which rescales what the block's other structures write; the score ignores that renormalisation.

    Measured on SmolLM2-135M, 20% of all parameters, WikiText-2 test, first 8,192 tokens in 512-token
    windows (dense perplexity 36.0), 32 calibration windows of 256 tokens: this form 89.6; dividing by
    the full residual energy instead 98.6. Wanda-sp's ``|W| * ||X||`` summed over all seven projections
    with a per-type median scale (64 windows) gave 182,071: it empties the first layers, whose
    activations are small.
    """

    name: ClassVar[str] = "activation"
    batch_size: int = 1
    engine: str = "layerwise"  # or "whole_model": the same statistics (pruning.calibration.engine)
    store: LayerStore | None = (
        None  # where the layers' weights are (pruning.source.streaming); None: resident
    )

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        observer = ActivationObserver(model)
        calibrate(model, windows, self.batch_size, [observer], self.engine, self.store)
        return observer.scores()


class ActivationObserver:
    """The activation criterion's statistics, gathered layer by layer; a layer is scored as soon as every
    window has been through it, and its statistics are dropped."""

    def __init__(self, model: nn.Module) -> None:
        self.adapter = adapter_for(model.config)
        self.head_dim = self.adapter.head_dim(model.config)
        self.num_layers = len(self.adapter.decoder_layers(model))
        self.collector = InputNormCollector()
        self.attention: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        return self.collector.attach(layer_idx, layer, _read_inputs(self.adapter, layer, self.head_dim))

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        collector, adapter = self.collector, self.adapter

        def importance(idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance | None:
            if owned.axis != 1:  # only what a structure writes into the stream counts
                return None
            residual_per_dim = collector.mean_square(idx, RESIDUAL)
            residual = float(residual_per_dim.median()) * residual_per_dim.numel()
            mean_sq = collector.mean_square(idx, owned.path).to(linear.weight.device)
            energy = linear.weight.detach().float().pow(2) * (mean_sq / residual)[None, :]
            norm_path = adapter.output_norm(adapter.block_of(owned.path))
            if norm_path is not None:
                gain = adapter.norm_gain(layer.get_submodule(norm_path)).pow(2)
                block_out = float(collector.mean_square(idx, norm_path).mean())
                energy = energy * (gain.to(energy.device) / block_out)[:, None]
            return energy, None

        scores = layer_structure_scores(adapter, layer, layer_idx, self.head_dim, importance)
        self.attention[layer_idx], self.mlp[layer_idx] = scores
        collector.forget(layer_idx)

    def scores(self) -> StructureScores:
        return layers_in_order(self.attention, self.mlp, self.num_layers)


def _read_inputs(adapter: FamilyAdapter, layer: nn.Module, head_dim: int) -> list[str]:
    """The modules whose inputs the activation score reads: the output projections structures own
    columns of, and any norm between such a projection and the residual stream."""
    geometry = adapter.geometry(layer, head_dim)
    paths: list[str] = []
    for kind in KINDS:
        if not geometry.count(kind):
            continue
        paths += [owned.path for owned in adapter.owned_slices(kind, geometry) if owned.axis == 1]
        norm = adapter.output_norm(kind)
        if norm is not None:
            paths.append(norm)
    return paths
