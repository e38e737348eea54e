"""FLAP (An et al., AAAI 2024): the fluctuation metric, AL-AM global ranking and bias compensation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.calibration.engine import Handle, calibrate
from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.families import ATTENTION, KINDS, MLP
from pruning.planning.plan import PruningPlan
from pruning.planning.planner import plan_global
from pruning.planning.scores import StructureScores
from pruning.surgery import apply_plan

from .common import Notes, count_params, describe, method_notes, output_projection


class _MeanVariance:
    """Per input column of a Linear: sum and sum of squares over calibration tokens (float64, so the
    variance does not cancel out), and the token count."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        if self.sum is None:
            self.sum, self.sumsq = x.sum(dim=0), x.pow(2).sum(dim=0)
        else:
            self.sum += x.sum(dim=0)
            self.sumsq += x.pow(2).sum(dim=0)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def variance(self) -> torch.Tensor:
        """Sample variance (n - 1), clamped at 0 against rounding."""
        return ((self.sumsq - self.sum.pow(2) / self.count) / max(self.count - 1, 1)).clamp_min(0)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


class FlapObserver:
    """FLAP's statistics, one layer at a time (the engine's observer protocol).

    Per input column j of o_proj / down_proj: ``S_j = Var(X_j) * ||W[:, j]||^2`` ("WIFV"), squared for
    attention (``prune_flap`` squares the o_proj metric), standardised within the layer and type
    (``(S - mean) / std``; ``standarlization`` in ``prune_flap`` works along each layer's row), then a
    KV group's score is the mean over its columns (FLAP: per 128-wide head) and a channel's is its
    column's. The column means are kept for the bias.
    """

    def __init__(self, model: nn.Module) -> None:
        self.m = describe(model)
        self.stats: dict[tuple[int, str], _MeanVariance] = {}
        self.scores: dict[tuple[int, str], torch.Tensor] = {}
        self.means: dict[tuple[int, str], torch.Tensor] = {}

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        handles = []
        for kind in KINDS:
            if self.m.adapter.geometry(layer, self.m.head_dim).count(kind):
                stat = self.stats[(layer_idx, kind)] = _MeanVariance()
                path = output_projection(self.m.adapter, layer, self.m.head_dim, kind).path
                handles.append(layer.get_submodule(path).register_forward_pre_hook(stat.hook))
        return handles

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        geometry = self.m.adapter.geometry(layer, self.m.head_dim)
        for kind in KINDS:
            count = geometry.count(kind)
            if not count:
                self.scores[(layer_idx, kind)] = torch.zeros(0)
                continue
            stat = self.stats.pop((layer_idx, kind))
            owned = output_projection(self.m.adapter, layer, self.m.head_dim, kind)
            weight = layer.get_submodule(owned.path).weight.detach().double()
            metric = stat.variance().to(weight.device) * weight.pow(2).sum(dim=0)
            if kind == ATTENTION:
                metric = metric.pow(2)
            standard = _standardise(metric)
            self.scores[(layer_idx, kind)] = (
                torch.stack([standard[owned.indices([s])].mean() for s in range(count)]).float().cpu()
            )
            self.means[(layer_idx, kind)] = stat.mean().float()


class CompensatedZeroAttention(ZeroAttention):
    """An emptied attention block that still writes its compensation bias (FLAP keeps o_proj's bias
    when every head goes); the KV-cache placeholder is ZeroAttention's."""

    def __init__(self, layer_idx: int, head_dim: int, bias: torch.Tensor) -> None:
        super().__init__(layer_idx, head_dim)
        self.bias = nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out, _ = super().forward(hidden_states, *args, **kwargs)
        return out + self.bias.to(out.dtype), None


class CompensatedZeroMLP(ZeroMLP):
    """An emptied MLP block that still writes its compensation bias."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(hidden_states) + self.bias.to(hidden_states.dtype)


def flap_compensation(
    model: nn.Module, plan: PruningPlan, means: dict[tuple[int, str], torch.Tensor]
) -> dict[tuple[int, str], torch.Tensor]:
    """FLAP's bias per pruned output projection, from the dense weights: ``W[:, removed] @ mean(X_removed)``,
    the mean contribution of the removed columns (``compress``: ``(mean_inp * ~mask) @ W.T``).
    Call before surgery; keys are (layer index, kind)."""
    m = describe(model)
    biases = {}
    for lp, layer in zip(plan.layers, m.layers, strict=True):
        for kind, removed in ((ATTENTION, lp.remove_kv_groups), (MLP, lp.remove_channels)):
            if not removed:
                continue
            owned = output_projection(m.adapter, layer, m.head_dim, kind)
            weight = layer.get_submodule(owned.path).weight.detach()
            cols = torch.tensor(owned.indices(removed), device=weight.device)
            mean = means[(lp.layer_idx, kind)].to(weight.device)
            biases[(lp.layer_idx, kind)] = (weight.double()[:, cols] @ mean.double()[cols]).to(weight.dtype)
    return biases


def _install_biases(model: nn.Module, plan: PruningPlan, biases: dict[tuple[int, str], torch.Tensor]) -> int:
    """Add each bias to its (pruned) output projection, creating the bias parameter where the stock
    architecture has none; an emptied block becomes a Compensated* stand-in. Returns parameters added."""
    m = describe(model)
    added = 0
    for (idx, kind), bias in biases.items():
        layer, lp = m.layers[idx], plan.layers[idx]
        emptied = lp.attention_removed if kind == ATTENTION else lp.mlp_removed
        if emptied:
            block = (
                CompensatedZeroAttention(idx, m.head_dim, bias)
                if kind == ATTENTION
                else CompensatedZeroMLP(bias)
            )
            layer.set_submodule(m.adapter.blocks[kind], block)
            added += bias.numel()
            continue
        linear = layer.get_submodule(output_projection(m.adapter, layer, m.head_dim, kind).path)
        if linear.bias is None:
            linear.bias = nn.Parameter(bias.clone(), requires_grad=linear.weight.requires_grad)
            added += bias.numel()
        else:
            with torch.no_grad():
                linear.bias += bias
    return added


def flap(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI
    2024; ``prune_flap`` with ``--metrics WIFV --structure AL-AM``, their default): ``FlapObserver``'s
    standardised fluctuation scores, ranked across all layers and both types on one scale, removed
    lowest first until the removed parameters reach the target (AL-AM weighs each head by its cost,
    512/3 channels, in the cumulative sum: the planner's cost walk does the same); then every pruned
    output projection gets the bias ``W[:, removed] @ mean(X_removed)``.

    Statistics come from the dense model (FLAP measures every layer before pruning any). Llama's
    o_proj/down_proj have no bias: one is created in memory, so the result needs a bias the stock
    architecture lacks (a stock config can only add biases to all of q/k/v/o or all MLP projections).
    """
    m = describe(model)
    before = count_params(model)
    observer = FlapObserver(model)
    calibrate(model, windows, batch_size, [observer], engine="layerwise")
    n = len(m.layers)
    # plan_global ranks score / cost when told the scores share a scale: multiplying by the cost makes
    # it rank the standardised scores themselves, as FLAP does.
    scores = StructureScores(
        attention=[observer.scores[(i, ATTENTION)].double() * m.costs[i].kv_group_cost for i in range(n)],
        mlp=[observer.scores[(i, MLP)].double() * m.costs[i].channel_cost for i in range(n)],
        common_scale=True,
    )
    plan = plan_global(model, scores, ratio, "total", criterion="flap")
    biases = flap_compensation(model, plan, observer.means)
    apply_plan(model, plan)
    added = _install_biases(model, plan, biases)
    return method_notes(
        "flap",
        model,
        before,
        ratio,
        plan,
        metric="WIFV, AL-AM, standardised per layer and type",
        bias_params_added=added,
        needs=(
            f"a bias on o_proj/down_proj ({added:,} parameters, counted) that the stock Llama "
            "architecture lacks"
        ),
    )
