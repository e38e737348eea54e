"""Importance criteria: how much each KV group and MLP channel of every decoder layer is worth.

Every criterion reduces to a per-weight importance for the seven Linear layers of a decoder layer
(and their biases); ``layer_structure_scores`` sums that importance over the weights each structure
owns, once for all criteria, so a structure's score scales with its size and the planner can divide
by its parameter cost. Scores go out as ``StructureScores``; the planner never sees a criterion.

Criteria, measured on SmolLM2-135M (see docs/DESIGN.md): magnitude alone is useless; activation-weighted
|W| x ||X|| (Wanda-sp / FLAP style) is far better. Activation statistics are per-Linear vectors of input
sums of squares, never stored activations, collected by ``InputNormCollector``, which can be attached
to one layer at a time when calibration later runs layer by layer on models too big for one forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.architectures import decoder_layers, head_dim_of, layer_geometry
from pruning.errors import UserError
from pruning.evaluation import input_device

logger = logging.getLogger(__name__)

ATTENTION_PROJS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# Structures own output rows of these (and their bias entries) ...
ROW_PROJS: frozenset[str] = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
# ... and input columns of these (their bias belongs to the residual stream, to no structure).
COLUMN_PROJS: frozenset[str] = frozenset({"o_proj", "down_proj"})
# InputNormCollector's key for a decoder layer's own input: the residual stream.
RESIDUAL = "residual"

# Per-weight importance of one Linear: shaped like its weight, and like its bias (None without bias).
Importance = tuple[torch.Tensor, torch.Tensor | None]
# (layer index, projection name, module) -> Importance, or None when the criterion ignores that Linear
WeightImportance = Callable[[int, str, nn.Linear], Importance | None]


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

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores: ...


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The prunable Linear modules a layer still has, by projection name (none of a Zero* block)."""
    found: dict[str, nn.Linear] = {}
    for block, names in ((layer.self_attn, ATTENTION_PROJS), (layer.mlp, MLP_PROJS)):
        for name in names:
            module = getattr(block, name, None)
            if isinstance(module, nn.Linear):
                found[name] = module
    return found


def _sum_per_structure(values: torch.Tensor, num_structures: int) -> torch.Tensor:
    """Split a 1-D vector into ``num_structures`` equal consecutive slices and sum each."""
    return values.reshape(num_structures, -1).sum(dim=1)


def layer_structure_scores(
    layer: nn.Module, layer_idx: int, head_dim: int, importance: WeightImportance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-weight importance over each KV group and each MLP channel of one layer.

    KV group g owns q rows of query heads g*G..(g+1)*G-1, k/v rows of KV head g and the matching o_proj
    columns: consecutive slices of equal size, because transformers' ``repeat_kv`` gives query head h
    the KV head h // G. Channel j owns gate/up row j and down column j. Only one Linear's importance
    tensor is alive at a time.
    """
    geom = layer_geometry(layer, head_dim)
    if geom.num_kv_heads and geom.num_heads % geom.num_kv_heads:
        raise ValueError(
            f"layer {layer_idx}: {geom.num_heads} query heads do not split into {geom.num_kv_heads} KV groups"
        )
    attention = torch.zeros(geom.num_kv_heads, dtype=torch.float32)
    mlp = torch.zeros(geom.intermediate_size, dtype=torch.float32)
    for name, linear in layer_linears(layer).items():
        target = attention if name in ATTENTION_PROJS else mlp
        if target.numel() == 0:
            continue
        result = importance(layer_idx, name, linear)
        if result is None:
            continue
        weight_imp, bias_imp = result
        if name in ROW_PROJS:
            per_unit = weight_imp.float().sum(dim=1)
            if bias_imp is not None:
                per_unit = per_unit + bias_imp.float()
        else:
            per_unit = weight_imp.float().sum(dim=0)
        target += _sum_per_structure(per_unit, target.numel()).cpu()
        del weight_imp, bias_imp
    return attention, mlp


def score_layers(
    model: nn.Module, importance: WeightImportance, common_scale: bool = False
) -> StructureScores:
    """``layer_structure_scores`` for every decoder layer of the model."""
    head_dim = head_dim_of(model.config)
    attention, mlp = [], []
    for idx, layer in enumerate(decoder_layers(model)):
        a, m = layer_structure_scores(layer, idx, head_dim, importance)
        attention.append(a)
        mlp.append(m)
    return StructureScores(attention=attention, mlp=mlp, common_scale=common_scale)


def _batches(windows: torch.LongTensor, batch_size: int, desc: str) -> Iterator[torch.LongTensor]:
    if windows is None or windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("this criterion needs calibration windows of shape [num_samples, seq_len]")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1 (got {batch_size})")
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        yield windows[start : start + batch_size]


class InputNormCollector:
    """Accumulates, per prunable Linear, the sum of squares of each input feature over all tokens.

    Attach it to any subset of layers (all at once, or one at a time for layer-by-layer calibration);
    it keeps one vector per Linear, never activations.
    """

    def __init__(self) -> None:
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layer_idx: int, layer: nn.Module, names: frozenset[str] | None = None) -> None:
        """Watch the layer's Linears (only ``names`` when given), and the layer's own input (the
        residual stream, key "residual")."""
        for name, linear in layer_linears(layer).items():
            if names is not None and name not in names:
                continue
            hook = self._make_hook((layer_idx, name))
            self._handles.append(linear.register_forward_pre_hook(hook, with_kwargs=True))
        hook = self._make_hook((layer_idx, RESIDUAL))
        self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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

    def norm(self, layer_idx: int, name: str) -> torch.Tensor:
        """||X_j||_2 over all tokens seen, per input feature j."""
        key = (layer_idx, name)
        if key not in self.sumsq:
            raise RuntimeError(f"layer {layer_idx} {name} saw no input during calibration")
        return self.sumsq[key].sqrt()

    def mean_square(self, layer_idx: int, name: str) -> torch.Tensor:
        """E[X_j^2] per input feature j, over all tokens seen."""
        self.norm(layer_idx, name)  # raises if nothing was seen
        return self.sumsq[(layer_idx, name)] / self.rows[(layer_idx, name)]


@dataclass
class ActivationCriterion:
    """How much of the residual stream a structure writes, relative to the stream at that layer.

    A KV group writes through its o_proj columns, a channel through its down_proj column; removing it
    takes away ``sum_j ||W[:, j]||^2 * E[x_j^2]`` of energy (x_j: the column's input over calibration
    tokens; cross terms ignored). Dividing by the residual stream's typical energy at the layer's input
    makes the score a share of what flows at that depth, comparable across layers and between attention
    and MLP, so one global ranking needs no per-type or per-layer rescaling. "Typical" is the median
    per-dimension energy times the width: a few "massive activation" dimensions dominate the stream's
    norm from the middle layers on and would make those layers look cheap.

    Measured on SmolLM2-135M, 20% of all parameters, WikiText-2 test, first 8,192 tokens in 512-token
    windows (dense perplexity 36.0), 32 calibration windows of 256 tokens: this form 89.6; dividing by
    the full residual energy instead 98.6. Wanda-sp's ``|W| * ||X||`` summed over all seven projections
    with a per-type median scale (64 windows) gave 182,071: it empties the first layers, whose
    activations are small.
    """

    name: ClassVar[str] = "activation"
    needs_data: ClassVar[bool] = True
    batch_size: int = 1

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        collector = InputNormCollector()
        device, was_training = input_device(model), model.training
        model.eval()
        try:
            for idx, layer in enumerate(decoder_layers(model)):
                collector.attach(idx, layer, names=COLUMN_PROJS)  # the only inputs the score reads
            with torch.no_grad():
                for batch in _batches(windows, self.batch_size, "activation statistics"):
                    model(input_ids=batch.to(device), use_cache=False)
        finally:
            collector.detach()
            model.train(was_training)

        def importance(layer_idx: int, name: str, linear: nn.Linear) -> Importance | None:
            if name not in COLUMN_PROJS:
                return None
            residual_per_dim = collector.mean_square(layer_idx, RESIDUAL)
            residual = float(residual_per_dim.median()) * residual_per_dim.numel()
            mean_sq = collector.mean_square(layer_idx, name).to(linear.weight.device)
            return linear.weight.detach().float().pow(2) * (mean_sq / residual)[None, :], None

        return score_layers(model, importance, common_scale=True)


@dataclass
class TaylorCriterion:
    """First-order Taylor |W * dL/dW| on the causal-LM loss, gradients of the mean loss over all windows.

    Needs a whole-model backward (memory of training one step); requires_grad flags and any existing
    gradients are restored afterwards.
    """

    name: ClassVar[str] = "taylor"
    needs_data: ClassVar[bool] = True
    batch_size: int = 1

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        all_params = list(model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in all_params]
        scored = [
            p
            for layer in decoder_layers(model)
            for lin in layer_linears(layer).values()
            for p in lin.parameters()
        ]
        device, was_training = input_device(model), model.training
        model.eval()  # no dropout; gradients still flow
        try:
            for p in all_params:
                p.requires_grad_(False)
                p.grad = None
            for p in scored:
                p.requires_grad_(True)
            total = windows.shape[0] if windows is not None else 0
            with torch.enable_grad():
                for batch in _batches(windows, self.batch_size, "taylor gradients"):
                    batch = batch.to(device)
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    (loss * (batch.shape[0] / total)).backward()
            return score_layers(model, _taylor_importance, common_scale=True)
        finally:
            for p, requires_grad, grad in saved:
                p.requires_grad_(requires_grad)
                p.grad = grad
            model.train(was_training)


def _taylor_importance(layer_idx: int, name: str, linear: nn.Linear) -> Importance:
    def one(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p, dtype=torch.float32)
        return (p.detach().float() * p.grad.float()).abs()

    return one(linear.weight), (one(linear.bias) if linear.bias is not None else None)


@dataclass
class MagnitudeCriterion:
    """sum |W| over a structure's weights. Needs no data; a baseline, useless on its own (DESIGN.md)."""

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False

    def score(self, model: nn.Module, windows: torch.LongTensor | None = None) -> StructureScores:
        def importance(layer_idx: int, name: str, linear: nn.Linear) -> Importance:
            bias = linear.bias.detach().float().abs() if linear.bias is not None else None
            return linear.weight.detach().float().abs(), bias

        return score_layers(model, importance)


CRITERIA: dict[str, type] = {
    ActivationCriterion.name: ActivationCriterion,
    TaylorCriterion.name: TaylorCriterion,
    MagnitudeCriterion.name: MagnitudeCriterion,
}


def get_criterion(name: str, **options: Any) -> ImportanceCriterion:
    """A criterion instance by registered name; ``options`` (e.g. batch_size) go to its constructor."""
    if name not in CRITERIA:
        known = ", ".join(sorted(CRITERIA))
        raise UserError(f"unknown importance criterion {name!r}: known criteria are {known}")
    try:
        return CRITERIA[name](**options)
    except TypeError as exc:
        raise UserError(f"importance criterion {name!r}: bad options {sorted(options)}: {exc}") from exc
