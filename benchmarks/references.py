"""Reference structured-pruning methods, re-implemented on this project's plan and surgery.

Every method is a function ``(model, windows, ratio, batch_size) -> notes`` that prunes ``model`` in
place until ``ratio`` of ALL its parameters are gone (the tied embedding counted once, as
``plan_global(..., ratio_of="total")`` counts; only decoder layers lose anything) and returns a small
JSON-ready dict: the parameters counted before and after, the share actually removed, and what the
method chose or needed. All but Torch-Pruning build a ``PruningPlan`` and remove it with
``pruning.surgery.apply_plan``, so the rows of a comparison differ only in *what* each removes.

Structures are this project's: a KV group (one KV head with the query heads that share it) and an MLP
channel. The papers' LLaMA-7B is multi-head attention, where a KV group is one head; on a GQA model
a "head" of theirs is a KV group here.

- ``random``: random scores, this project's global ranking (seeded).
- ``magnitude_uniform``: L2 norm of the weights each structure owns, same share in every layer.
- ``wanda_sp_uniform``: Wanda-sp as FLAP's baseline (An et al., AAAI 2024, github.com/CASIA-IVA-Lab/FLAP
  ``lib/prune.py:prune_wanda_sp``), same share in every layer.
- ``llm_pruner_taylor``: LLM-Pruner block-wise (Ma et al., NeurIPS 2023, github.com/horseee/LLM-Pruner
  ``hf_prune.py --block_wise --pruner_type taylor --taylor param_first``), middle layers only.
- ``flap``: FLAP's fluctuation metric, AL-AM global ranking and bias compensation (``prune_flap``).
- ``torch_pruning``: Torch-Pruning's own ``BasePruner`` (alias ``MetaPruner``) configured as its
  ``examples/LLMs/prune_llm.py`` (v1.6.1) does; its own surgery, and what it needed is in the notes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from pruning.engine import Handle, calibrate, capture_layer_inputs, to_device
from pruning.families import ATTENTION, KINDS, MLP, FamilyAdapter, OwnedSlice, adapter_for
from pruning.families.base import LayerCosts
from pruning.importance import (
    Importance,
    InputNormCollector,
    StructureScores,
    TaylorCriterion,
    layer_structure_scores,
)
from pruning.modules import ZeroAttention, ZeroMLP
from pruning.plan import LayerPlan, PruningPlan
from pruning.planner import plan_global
from pruning.surgery import apply_layer_plan, apply_plan

logger = logging.getLogger(__name__)

Notes = dict[str, Any]
ReferenceMethod = Callable[[nn.Module, torch.LongTensor, float, int], Notes]

# LLM-Pruner's LLaMA-7B runs prune layers [4, 30) of 32 (README and scripts/llama_prune.sh): the first
# 4 and last 2 keep everything. Scaled to the model's depth, at least one at each end.
LLM_PRUNER_SKIP_FIRST = 4 / 32
LLM_PRUNER_SKIP_LAST = 2 / 32


def count_params(model: nn.Module) -> int:
    """All parameters, a tied embedding once (``parameters()`` de-duplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class _Model:
    """What every method asks about the model: its family adapter, head width, layers and their costs."""

    adapter: FamilyAdapter
    head_dim: int
    layers: nn.ModuleList
    costs: list[LayerCosts]


def _describe(model: nn.Module) -> _Model:
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    layers = adapter.decoder_layers(model)
    return _Model(adapter, head_dim, layers, [adapter.costs(layer, head_dim) for layer in layers])


def _output_projection(adapter: FamilyAdapter, layer: nn.Module, head_dim: int, kind: str) -> OwnedSlice:
    """The Linear whose input columns structures of ``kind`` own (o_proj, down_proj): what they write."""
    geometry = adapter.geometry(layer, head_dim)
    return next(o for o in adapter.owned_slices(kind, geometry) if o.axis == 1)


def _notes(
    method: str, model: nn.Module, before: int, ratio: float, plan: PruningPlan | None, **extra: Any
) -> Notes:
    after = count_params(model)
    notes: Notes = {
        "method": method,
        "ratio": ratio,
        "params_before": before,
        "params_after": after,
        "removed_share": (before - after) / before,
    }
    if plan is not None:
        notes["removed_kv_groups"] = sum(len(lp.remove_kv_groups) for lp in plan.layers)
        notes["removed_channels"] = sum(len(lp.remove_channels) for lp in plan.layers)
        notes["attention_blocks_removed"] = [lp.layer_idx for lp in plan.layers if lp.attention_removed]
        notes["mlp_blocks_removed"] = [lp.layer_idx for lp in plan.layers if lp.mlp_removed]
    notes.update(extra)
    logger.info(
        "%s: removed %.2f%% of all parameters (%s -> %s)",
        method,
        100 * notes["removed_share"],
        f"{before:,}",
        f"{after:,}",
    )
    return notes


# ---------------------------------------------------------------------------------------- uniform shares


@dataclass(frozen=True)
class UniformCounts:
    """The same number of KV groups and MLP channels removed from each of ``layers``."""

    kv_groups: int
    channels: int
    layers: tuple[int, ...]


def _removed_per_layer(lc: LayerCosts, kv_groups: int, channels: int) -> int:
    removed = kv_groups * lc.kv_group_cost + channels * lc.channel_cost
    if kv_groups == lc.num_kv_groups:
        removed += lc.attention_block_cost
    if channels == lc.num_channels:
        removed += lc.mlp_block_cost
    return removed


def uniform_counts(costs: Sequence[LayerCosts], target: float, layers: Sequence[int]) -> UniformCounts:
    """Counts for a uniform share: the share of each layer's prunable parameters the target needs,
    KV groups rounded to the nearest whole group (there are few), then the fewest channels that make
    the total reach ``target``. The overshoot is below one channel per layer.

    Raises ValueError for layers of different shapes (an already pruned model) or an unreachable target.
    """
    layers = tuple(layers)
    shapes = {
        (costs[i].num_kv_groups, costs[i].num_channels, costs[i].kv_group_cost, costs[i].channel_cost)
        for i in layers
    }
    if len(shapes) != 1:
        raise ValueError(
            f"a uniform share needs layers of one shape; layers {list(layers)} have {len(shapes)}"
        )
    lc, n = costs[layers[0]], len(layers)

    def total(k: int, c: int) -> int:
        return n * _removed_per_layer(lc, k, c)

    if total(lc.num_kv_groups, lc.num_channels) < target:
        raise ValueError(f"layers {list(layers)} hold fewer than the {target:,.0f} parameters to remove")
    share = target / total(lc.num_kv_groups, lc.num_channels)
    k = min(round(share * lc.num_kv_groups), lc.num_kv_groups)
    while k > 0 and total(k, 0) > target:
        k -= 1
    while total(k, lc.num_channels) < target:
        k += 1
    lo, hi = 0, lc.num_channels  # the fewest channels with total(k, c) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if total(k, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return UniformCounts(k, lo, layers)


def _uniform_plan(
    costs: Sequence[LayerCosts],
    scores: StructureScores,
    counts: UniformCounts,
    criterion: str,
    before: int,
    target: float,
) -> PruningPlan:
    """Remove the lowest-scoring ``counts`` structures of each counted layer (stable sort: ties by index)."""
    plans = []
    for idx, lc in enumerate(costs):
        groups: tuple[int, ...] = ()
        channels: tuple[int, ...] = ()
        if idx in counts.layers:
            groups = tuple(torch.argsort(scores.attention[idx], stable=True)[: counts.kv_groups].tolist())
            channels = tuple(torch.argsort(scores.mlp[idx], stable=True)[: counts.channels].tolist())
        plans.append(LayerPlan(idx, lc.num_kv_groups, lc.num_channels, groups, channels))
    removed = sum(_removed_per_layer(costs[i], counts.kv_groups, counts.channels) for i in counts.layers)
    return PruningPlan(
        layers=tuple(plans),
        criterion=criterion,
        params_before=before,
        params_target=before - round(target),
        params_planned=before - removed,
        extra={"uniform": True},
    )


def _uniform_notes(counts: UniformCounts, costs: Sequence[LayerCosts]) -> Notes:
    lc = costs[counts.layers[0]]
    return {
        "pruned_layers": f"{counts.layers[0]}..{counts.layers[-1]} ({len(counts.layers)} of {len(costs)})",
        "per_layer_kv_groups": f"{counts.kv_groups} of {lc.num_kv_groups}",
        "per_layer_channels": f"{counts.channels} of {lc.num_channels}",
        "per_layer_share": round(
            _removed_per_layer(lc, counts.kv_groups, counts.channels)
            / _removed_per_layer(lc, lc.num_kv_groups, lc.num_channels),
            4,
        ),
    }


# ---------------------------------------------------------------------------------------------- methods


def random(
    model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int, seed: int = 0
) -> Notes:
    """Uniform random scores for every structure, ranked globally by this project's planner.

    The planner divides by cost and by each type's median, so a KV group and a channel are equally
    likely to go per parameter they free. Needs no data.
    """
    m = _describe(model)
    before = count_params(model)
    gen = torch.Generator().manual_seed(seed)
    scores = StructureScores(
        attention=[torch.rand(lc.num_kv_groups, generator=gen) for lc in m.costs],
        mlp=[torch.rand(lc.num_channels, generator=gen) for lc in m.costs],
    )
    plan = plan_global(model, scores, ratio, "total", criterion="random")
    apply_plan(model, plan)
    return _notes("random", model, before, ratio, plan, seed=seed)


def magnitude_uniform(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """Within each layer, the structures whose owned weights have the smallest L2 norm go.

    L2 over every weight a structure owns (q/k/v rows and o_proj columns of a KV group; gate/up rows and
    the down_proj column of a channel), the same counts in every layer. FLAP's ``mag_sp`` baseline uses
    only the output projection's columns; this reads all the structure's weights, as LLM-Pruner's L2
    does. Needs no data.
    """
    m = _describe(model)
    before = count_params(model)
    target = ratio * before

    def squares(idx: int, owned: OwnedSlice, linear: nn.Linear) -> Importance:
        bias = linear.bias.detach().float().pow(2) if linear.bias is not None and owned.axis == 0 else None
        return linear.weight.detach().float().pow(2), bias

    attention, mlp = [], []
    for idx, layer in enumerate(m.layers):
        a, c = layer_structure_scores(m.adapter, layer, idx, m.head_dim, squares)
        attention.append(a.sqrt())
        mlp.append(c.sqrt())
    counts = uniform_counts(m.costs, target, range(len(m.layers)))
    plan = _uniform_plan(
        m.costs, StructureScores(attention, mlp), counts, "magnitude_uniform", before, target
    )
    apply_plan(model, plan)
    return _notes(
        "magnitude_uniform",
        model,
        before,
        ratio,
        plan,
        norm="L2 over all owned weights",
        **_uniform_notes(counts, m.costs),
    )


@torch.no_grad()
def _run_layer(layer: nn.Module, idx: int, inputs: Any, replace: bool) -> None:
    """One decoder layer on every cached batch; with ``replace`` its outputs feed the next layer."""
    device = next((p.device for p in layer.parameters()), inputs.hidden[0].device)
    for b, hidden in enumerate(inputs.hidden):
        args, kwargs = to_device((inputs.args[idx][b], inputs.kwargs[idx][b]), device)
        out = layer(hidden.to(device), *args, **kwargs)
        if replace:
            inputs.hidden[b] = out[0] if isinstance(out, tuple) else out


def wanda_sp_uniform(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """Wanda-sp (FLAP's structured Wanda baseline): a structure's score is the sum, over the output
    projection's input columns j it owns and every output row i, of ``|W_ij| * ||X_j||_2``, with X the
    calibration inputs of o_proj / down_proj. Same counts in every layer.

    As FLAP's ``prune_wanda_sp``, layer by layer: layer i is measured on what the already pruned layers
    0..i-1 output, pruned, and run again to feed layer i+1. (FLAP averages over rows instead of
    summing: a constant factor within a layer, the same ranking.)
    """
    m = _describe(model)
    before = count_params(model)
    target = ratio * before
    counts = uniform_counts(m.costs, target, range(len(m.layers)))
    was_training = model.training
    model.eval()
    layer_plans = []
    try:
        inputs = capture_layer_inputs(model, windows, batch_size)
        for idx, layer in enumerate(m.layers):
            collector = InputNormCollector()
            paths = [_output_projection(m.adapter, layer, m.head_dim, kind).path for kind in KINDS]
            handles: list[Handle] = collector.attach(idx, layer, paths)
            try:
                _run_layer(layer, idx, inputs, replace=False)
            finally:
                for handle in handles:
                    handle.remove()

            def wanda(
                i: int, owned: OwnedSlice, linear: nn.Linear, collector: InputNormCollector = collector
            ) -> Importance | None:
                if owned.axis != 1:
                    return None
                norm = (
                    collector.mean_square(i, owned.path).sqrt().to(linear.weight.device)
                )  # ||X_j|| / sqrt(tokens)
                return linear.weight.detach().float().abs() * norm[None, :], None

            a, c = layer_structure_scores(m.adapter, layer, idx, m.head_dim, wanda)
            lc = m.costs[idx]
            layer_plan = LayerPlan(
                idx,
                lc.num_kv_groups,
                lc.num_channels,
                tuple(torch.argsort(a, stable=True)[: counts.kv_groups].tolist()),
                tuple(torch.argsort(c, stable=True)[: counts.channels].tolist()),
            )
            apply_layer_plan(model, layer_plan)
            layer_plans.append(layer_plan)
            _run_layer(m.adapter.decoder_layers(model)[idx], idx, inputs, replace=True)
            inputs.args[idx], inputs.kwargs[idx] = [], []
    finally:
        model.train(was_training)
    return _notes(
        "wanda_sp_uniform",
        model,
        before,
        ratio,
        PruningPlan(layers=tuple(layer_plans), criterion="wanda_sp_uniform"),
        calibration="sequential: each layer measured on the pruned layers' outputs, as FLAP's prune_wanda_sp",
        **_uniform_notes(counts, m.costs),
    )


def llm_pruner_taylor(model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int) -> Notes:
    """LLM-Pruner, block-wise, first-order element-wise Taylor ("Element1", ``--taylor param_first``,
    the setting of their ``scripts/llama_prune.sh`` LLaMA-7B ~20% run): a group's importance is
    ``sum |w * dL/dw|`` over every weight of the group (q/k/v rows and o_proj columns of a head, gate/up
    rows and the down_proj column of a channel; per-weight terms summed per channel, channels summed per
    head, group members summed: ``grouping_strategy sum``). That is exactly this project's
    ``TaylorCriterion``, reused here. L: the mean causal-LM loss over all calibration windows (LLM-Pruner
    uses 10 bookcorpus samples of 64 tokens; here the same windows as every row).

    The same counts in every middle layer: LLM-Pruner prunes layers 4..29 of LLaMA-7B's 32 at a group
    ratio of 0.25 for ~20% of the parameters; here the first round(L*4/32) and last round(L*2/32)
    layers (at least one each) keep everything, and the middle layers' share is raised until the total
    reaches the target.
    """
    m = _describe(model)
    before = count_params(model)
    target = ratio * before
    n = len(m.layers)
    first = max(1, round(n * LLM_PRUNER_SKIP_FIRST))
    last = max(1, round(n * LLM_PRUNER_SKIP_LAST))
    counts = uniform_counts(m.costs, target, range(first, n - last))
    scores = TaylorCriterion(batch_size=batch_size).score(model, windows)
    plan = _uniform_plan(m.costs, scores, counts, "llm_pruner_taylor", before, target)
    apply_plan(model, plan)
    return _notes(
        "llm_pruner_taylor",
        model,
        before,
        ratio,
        plan,
        taylor="param_first (element-wise |w*g|, summed per group)",
        **_uniform_notes(counts, m.costs),
    )


# ------------------------------------------------------------------------------------------------- FLAP


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
        self.m = _describe(model)
        self.stats: dict[tuple[int, str], _MeanVariance] = {}
        self.scores: dict[tuple[int, str], torch.Tensor] = {}
        self.means: dict[tuple[int, str], torch.Tensor] = {}

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        handles = []
        for kind in KINDS:
            if self.m.adapter.geometry(layer, self.m.head_dim).count(kind):
                stat = self.stats[(layer_idx, kind)] = _MeanVariance()
                path = _output_projection(self.m.adapter, layer, self.m.head_dim, kind).path
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
            owned = _output_projection(self.m.adapter, layer, self.m.head_dim, kind)
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
    m = _describe(model)
    biases = {}
    for lp, layer in zip(plan.layers, m.layers, strict=True):
        for kind, removed in ((ATTENTION, lp.remove_kv_groups), (MLP, lp.remove_channels)):
            if not removed:
                continue
            owned = _output_projection(m.adapter, layer, m.head_dim, kind)
            weight = layer.get_submodule(owned.path).weight.detach()
            cols = torch.tensor(owned.indices(removed), device=weight.device)
            mean = means[(lp.layer_idx, kind)].to(weight.device)
            biases[(lp.layer_idx, kind)] = (weight.double()[:, cols] @ mean.double()[cols]).to(weight.dtype)
    return biases


def _install_biases(model: nn.Module, plan: PruningPlan, biases: dict[tuple[int, str], torch.Tensor]) -> int:
    """Add each bias to its (pruned) output projection, creating the bias parameter where the stock
    architecture has none; an emptied block becomes a Compensated* stand-in. Returns parameters added."""
    m = _describe(model)
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
        linear = layer.get_submodule(_output_projection(m.adapter, layer, m.head_dim, kind).path)
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
    m = _describe(model)
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
    return _notes(
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


# ---------------------------------------------------------------------------------------- Torch-Pruning


def _where(exc: BaseException) -> str:
    """Where an exception was raised, as ``file:line in function`` (site-packages stripped)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, _Hung):  # the last frame is the alarm's handler; report where it interrupted
        frames = frames[:-1]
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.split('site-packages/')[-1]}:{last.lineno} in {last.name}"


def _error(exc: BaseException) -> str:
    if isinstance(exc, _Hung):
        return f"no result after {exc.args[0]:.0f} s, stopped in {_where(exc)} (hangs)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]} ({_where(exc)})"


class _Hung(TimeoutError):
    """Raised into a Torch-Pruning call that ran past its deadline."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` with ``_Hung``: Torch-Pruning's dependency tracing loops
    forever on some GQA shapes (4 query heads over 2 KV heads, for one). Needs the main thread (SIGALRM);
    elsewhere the block runs without a deadline. Torch-Pruning's warnings are silenced inside."""
    with warnings.catch_warnings():
        # It warns, once per trace, that it will prune the norms' weights along their only dimension:
        # right for RMSNorm, and noise in every row's log.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            yield
            return
        with _alarm(seconds):
            yield


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds`` raises ``_Hung`` in the main thread; the old handler comes back after."""

    def interrupt(signum: int, frame: Any) -> None:
        raise _Hung(seconds)

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _example_pruner(tp: Any, model: nn.Module, example_inputs: torch.Tensor, ratio: float) -> Any:
    """``examples/LLMs/prune_llm.py``'s pruner, as written there (v1.6.1): magnitude importance, local
    (per-layer) ratio for the width and for whole heads, lm_head ignored, channels rounded to 4."""
    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    return tp.pruner.BasePruner(
        model,
        example_inputs=example_inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        output_transform=lambda x: x.logits,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        out_channel_groups={},
        round_to=4,
    )


def _prune_with(
    tp: Any, model: nn.Module, example_inputs: torch.Tensor, ratio: float, timeout_s: float
) -> None:
    with _deadline(timeout_s):
        pruner = _example_pruner(tp, model, example_inputs, ratio)
        for group in pruner.step(interactive=True):
            group.prune()


def _twin(model: nn.Module, attn_implementation: str) -> nn.Module:
    """A one-layer copy of the model's architecture with a small vocabulary and random weights: the
    example's per-layer (local) pruning removes the same counts from it, in a fraction of the time."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    config.vocab_size = 256
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 256:
            setattr(config, key, None)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    config.use_cache = False
    torch.manual_seed(0)
    twin = type(model)._from_config(config, attn_implementation=attn_implementation)
    return twin.float().eval()


def _predicted_params(twin: nn.Module, num_layers: int, vocab: int, tied: bool) -> int:
    """The real model's size after the pruning the twin received: its layer's parameters per layer,
    embedding (and an untied head) at the real vocabulary, the final norm."""
    width = twin.get_input_embeddings().weight.shape[1]
    layer = sum(p.numel() for p in adapter_for(twin.config).decoder_layers(twin)[0].parameters())
    norm = sum(p.numel() for n, p in twin.named_parameters() if n.startswith("model.norm"))
    return num_layers * layer + vocab * width * (1 if tied else 2) + norm


def _fix_after_pruning(model: nn.Module, tied: bool) -> list[str]:
    """The example's attribute and config updates, plus what this transformers needs; returns each
    adjustment beyond the example's."""
    needed = []
    config = model.config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and head.weight is not embed.weight:
        if head.weight.shape == embed.weight.shape and torch.equal(head.weight, embed.weight):
            extra = head.weight.numel()
            head.weight = embed.weight
            needed.append(
                f"re-tied lm_head to embed_tokens: torch-pruning pruned the shared weight's two uses with "
                f"the same columns but left two tensors (+{extra:,} parameters untied)"
            )
        else:
            needed.append("lm_head and embed_tokens came out different: left untied and counted twice")
    config.hidden_size = head.in_features  # the example's updates from here on
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            config.num_attention_heads = heads
            config.num_key_value_heads = kv_heads
            module.num_key_value_groups = heads // kv_heads
            if heads % kv_heads:
                needed.append(f"{name}: {heads} query heads do not split over {kv_heads} KV heads")
        elif name.endswith("mlp") and hasattr(module, "gate_proj"):
            config.intermediate_size = module.gate_proj.out_features
    return needed


def torch_pruning(
    model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int, timeout_s: float = 900.0
) -> Notes:
    """Torch-Pruning (Fang et al., "DepGraph", CVPR 2023; github.com/VainF/Torch-Pruning) pruning the
    model itself, configured as its ``examples/LLMs/prune_llm.py``: it narrows the hidden size (the
    residual stream, embeddings included), the MLP channels and whole query heads by one local ratio,
    ranked by group L2 magnitude. ``pruning_ratio`` is a width ratio, so it is searched on a one-layer
    twin (``_twin``) until the real model's predicted size loses ~``ratio`` of all parameters; the real
    share is counted after pruning. Tracing runs on the first 8 tokens of the first window (the example
    uses "Hello world."; magnitude needs no data).

    Every adjustment beyond the example's is listed in ``notes["needed"]``; a failure ends the method
    with ``notes["failed"]`` naming the step and the error, and the model is then unusable.
    """
    before = count_params(model)
    notes: Notes = {"method": "torch_pruning", "ratio": ratio, "params_before": before, "needed": []}
    needed: list[str] = notes["needed"]
    try:
        import torch_pruning as tp  # noqa: PLC0415 - optional: the row says so when it is missing
    except ImportError as exc:
        notes["failed"] = f"import torch_pruning: {exc}"
        return notes
    try:
        notes["torch_pruning_version"] = version("torch-pruning")
    except PackageNotFoundError:
        notes["torch_pruning_version"] = "unknown"
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    num_layers, vocab = config.num_hidden_layers, config.vocab_size
    example = windows[:1, :8].to(model.get_input_embeddings().weight.device)
    twin_example = torch.arange(3, 11).unsqueeze(0)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    config.use_cache = False
    needed.append("model.config.use_cache = False before tracing")

    try:  # 1. the example as it is, with the attention the model was loaded with
        _prune_with(tp, _twin(model, impl), twin_example, ratio, timeout_s)
    except Exception as exc:  # any failure is the finding this row reports
        if impl == "eager":
            notes["failed"] = f"pruner.step on the model's architecture ({impl} attention): {_error(exc)}"
            return notes
        needed.append(f"eager attention: with {impl} attention pruner.step fails: {_error(exc)}")
        impl = "eager"
        try:
            model.set_attn_implementation("eager")
        except Exception as exc2:  # noqa: BLE001 - reported
            notes["failed"] = f"switching to eager attention: {_error(exc2)}"
            return notes

    start = time.perf_counter()  # 2. the width ratio that removes ~ratio of all parameters
    tried = []
    lo, hi = 0.0, 0.95
    try:
        for _ in range(12):
            mid = (lo + hi) / 2
            twin = _twin(model, impl)
            _prune_with(tp, twin, twin_example, mid, timeout_s)
            share = 1 - _predicted_params(twin, num_layers, vocab, tied) / before
            tried.append((abs(share - ratio), mid, share))
            lo, hi = (mid, hi) if share < ratio else (lo, mid)
    except Exception as exc:  # noqa: BLE001 - reported
        notes["failed"] = f"ratio search on a one-layer twin: {_error(exc)}"
        return notes
    _, width_ratio, predicted = min(tried)
    notes.update(
        pruning_ratio=round(width_ratio, 5),
        predicted_share=round(predicted, 5),
        ratio_search_s=round(time.perf_counter() - start, 2),
    )

    with _deadline(timeout_s):  # 3. the real model
        try:
            pruner = _example_pruner(tp, model, example, width_ratio)
        except Exception as exc:  # noqa: BLE001 - reported
            notes["failed"] = f"building the dependency graph (BasePruner.__init__): {_error(exc)}"
            return notes
        try:
            for group in pruner.step(interactive=True):
                group.prune()
        except Exception as exc:  # noqa: BLE001 - reported
            notes["failed"] = f"pruner.step / group.prune: {_error(exc)}"
            return notes
        finally:
            del pruner
    needed.extend(_fix_after_pruning(model, tied))
    layer = adapter_for(config).decoder_layers(model)[0]
    attn = layer.self_attn
    notes["shapes"] = (
        f"hidden {config.hidden_size}, query heads {attn.q_proj.out_features // attn.head_dim}, KV heads "
        f"{attn.k_proj.out_features // attn.head_dim}, intermediate {layer.mlp.gate_proj.out_features} "
        "(every layer)"
    )
    try:  # 4. it must run
        with torch.no_grad():
            model.eval()(input_ids=example, use_cache=False)
    except Exception as exc:  # noqa: BLE001 - reported
        notes["failed"] = f"forward after pruning: {_error(exc)}"
        return notes
    return {**notes, **_notes("torch_pruning", model, before, ratio, None)}


METHODS: dict[str, ReferenceMethod] = {
    "random": random,
    "magnitude_uniform": magnitude_uniform,
    "torch_pruning": torch_pruning,
    "wanda_sp_uniform": wanda_sp_uniform,
    "llm_pruner_taylor": llm_pruner_taylor,
    "flap": flap,
}
