"""Importance criteria: how much each KV group and MLP channel of every decoder layer is worth.

Every criterion reduces to a per-weight importance for the Linears whose entries structures own (the
family adapter's ``OwnedSlice``s, fused projections included); ``layer_structure_scores`` sums that
importance over the entries each structure owns, once for all criteria, so a structure's score scales
with its size and the planner can divide by its parameter cost. Scores go out as ``StructureScores``;
the planner never sees a criterion.

Criteria, measured on SmolLM2-135M (README, "Measured figures"): magnitude alone is useless;
activation-weighted scores are far better; how they read families with post-norms is in
docs/families.md. Activation statistics are per-module vectors of input sums of squares, never stored
activations, collected by ``InputNormCollector``, which can be attached to one layer at a time when
calibration later runs layer by layer on models too big for one forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from pruning.engine import Handle, LayerStore, accumulate_gradients, calibrate, each_layer
from pruning.errors import UserError
from pruning.families import KINDS, FamilyAdapter, OwnedSlice, adapter_for

logger = logging.getLogger(__name__)

# InputNormCollector's key for a decoder layer's own input: the residual stream.
RESIDUAL = "residual"

# Per-weight importance of one Linear: shaped like its weight, and like its bias (None without bias).
Importance = tuple[torch.Tensor, torch.Tensor | None]
# (layer index, the entries structures own in it, the Linear) -> Importance, or None to ignore that Linear
WeightImportance = Callable[[int, OwnedSlice, nn.Linear], Importance | None]


@dataclass
class StructureScores:
    """Per layer: one score per KV group (empty when attention is gone) and one per MLP channel.

    ``common_scale`` says the criterion already put every structure of every layer on one scale (a
    share of the residual stream's energy, a loss change); otherwise the planner normalises per type.
    """

    attention: list[torch.Tensor]
    mlp: list[torch.Tensor]
    common_scale: bool = False


class ImportanceCriterion(Protocol):
    name: ClassVar[str]
    needs_data: ClassVar[bool]  # False: scores from weights alone, no calibration windows, no batch_size
    needs_backward: ClassVar[bool]  # True: a backward through the whole model in memory (never streamed)

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores: ...


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


class InputNormCollector:
    """Accumulates, per watched module, the sum of squares of each input feature over all tokens.

    Attach it to any subset of layers (all at once, or one at a time for layer-by-layer calibration);
    it keeps one vector per module, never activations.
    """

    def __init__(self) -> None:
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}

    def attach(self, layer_idx: int, layer: nn.Module, paths: Iterable[str]) -> list[Handle]:
        """Watch the inputs of the layer's submodules at ``paths`` (key ``(layer_idx, path)``), and the
        layer's own input, the residual stream (key ``(layer_idx, "residual")``); returns the hooks."""
        handles = []
        for path in paths:
            hook = self._make_hook((layer_idx, path))
            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
        hook = self._make_hook((layer_idx, RESIDUAL))
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def forget(self, layer_idx: int) -> None:
        """Drop one layer's statistics (once its scores are computed)."""
        for key in [k for k in self.sumsq if k[0] == layer_idx]:
            del self.sumsq[key], self.rows[key]

    def _make_hook(self, key: tuple[int, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            x = x.detach().reshape(-1, x.shape[-1]).float()
            sq = x.pow(2).sum(dim=0)
            if key in self.sumsq:
                self.sumsq[key] += sq
                self.rows[key] += x.shape[0]
            else:
                self.sumsq[key] = sq
                self.rows[key] = x.shape[0]

        return hook

    def mean_square(self, layer_idx: int, name: str) -> torch.Tensor:
        """E[X_j^2] per input feature j, over all tokens seen."""
        key = (layer_idx, name)
        if key not in self.sumsq:
            raise RuntimeError(f"layer {layer_idx} {name} saw no input during calibration")
        return self.sumsq[key] / self.rows[key]


@dataclass
class ActivationCriterion:
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
    needs_data: ClassVar[bool] = True
    needs_backward: ClassVar[bool] = False
    batch_size: int = 1
    engine: str = "layerwise"  # or "whole_model": the same statistics (pruning.engine)
    store: LayerStore | None = None  # where the layers' weights are (pruning.streaming); None: resident

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


def layers_in_order(
    attention: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor], num_layers: int
) -> StructureScores:
    """Per-layer scores an observer gathered as layers finished, in layer order, on one common scale."""
    missing = [i for i in range(num_layers) if i not in attention]
    if missing:
        raise RuntimeError(f"layers {missing} were never calibrated")
    order = range(num_layers)
    return StructureScores([attention[i] for i in order], [mlp[i] for i in order], common_scale=True)


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


@dataclass
class TaylorCriterion:
    """First-order Taylor |W * dL/dW| on the causal-LM loss, gradients of the mean loss over all windows.

    Needs a whole-model backward: the weights, their gradients for the scored Linears, and one batch's
    activations. ``gradient_checkpointing`` keeps only each decoder layer's input and recomputes the rest
    in the backward (activation memory of one layer instead of all, about one more forward of time).
    requires_grad flags and any existing gradients are restored afterwards.
    """

    name: ClassVar[str] = "taylor"
    needs_data: ClassVar[bool] = True
    needs_backward: ClassVar[bool] = True
    batch_size: int = 1
    gradient_checkpointing: bool = False

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        if any(p.is_meta for p in model.parameters()):
            raise UserError(
                "pruning.importance: taylor needs a backward through the whole model, which a streamed "
                "model cannot do; use activation or magnitude, or a device_map that holds the model"
            )
        all_params = list(model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in all_params]
        adapter = adapter_for(model.config)
        head_dim = adapter.head_dim(model.config)
        layers = adapter.decoder_layers(model)
        scored = [
            p
            for layer in layers
            for _, linear in owned_linears(adapter, layer, head_dim)
            for p in linear.parameters()
        ]
        was_training = model.training
        was_checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        model.eval()  # no dropout; gradients still flow
        try:
            for p in all_params:
                p.requires_grad_(False)
                p.grad = None
            for p in scored:
                p.requires_grad_(True)
            if self.gradient_checkpointing and not was_checkpointing:
                model.activation_checkpointing_enable({"use_reentrant": False})
            if self.gradient_checkpointing:
                for layer in layers:  # transformers checkpoints a layer only in training mode; its
                    layer.training = True  # submodules stay in eval mode, so dropout stays off
            accumulate_gradients(model, windows, self.batch_size)
            return score_layers(model, _taylor_importance, common_scale=True)
        finally:
            for p, requires_grad, grad in saved:
                p.requires_grad_(requires_grad)
                p.grad = grad
            if self.gradient_checkpointing and not was_checkpointing:
                model.activation_checkpointing_disable()
            model.train(was_training)


def _taylor_importance(layer_idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
    def one(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p, dtype=torch.float32)
        return (p.detach().float() * p.grad.float()).abs()

    return one(linear.weight), (one(linear.bias) if linear.bias is not None else None)


@dataclass
class MagnitudeCriterion:
    """sum |W| over a structure's weights. Needs no data; a baseline, useless on its own (README)."""

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False
    needs_backward: ClassVar[bool] = False
    store: LayerStore | None = None  # where the layers' weights are (pruning.streaming); None: resident

    def score(self, model: nn.Module, windows: torch.LongTensor | None = None) -> StructureScores:
        def importance(layer_idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
            bias = linear.bias.detach().float().abs() if linear.bias is not None else None
            return linear.weight.detach().float().abs(), bias

        return score_layers(model, importance, store=self.store)


CRITERIA: dict[str, type] = {
    ActivationCriterion.name: ActivationCriterion,
    TaylorCriterion.name: TaylorCriterion,
    MagnitudeCriterion.name: MagnitudeCriterion,
}


def _register_refit_error() -> None:
    from pruning.refit_error import (
        FisherObsCriterion,
        ObsCriterion,
        RefitErrorCriterion,
    )  # they use this module

    for criterion in (RefitErrorCriterion, ObsCriterion, FisherObsCriterion):
        CRITERIA[criterion.name] = criterion


_register_refit_error()


def get_criterion(name: str, **options: Any) -> ImportanceCriterion:
    """A criterion instance by registered name; ``options`` (e.g. batch_size) go to its constructor."""
    if name not in CRITERIA:
        known = ", ".join(sorted(CRITERIA))
        raise UserError(f"unknown importance criterion {name!r}: known criteria are {known}")
    try:
        return CRITERIA[name](**options)
    except TypeError as exc:
        raise UserError(f"importance criterion {name!r}: bad options {sorted(options)}: {exc}") from exc
