"""Wanda-sp as FLAP's baseline (``lib/prune.py:prune_wanda_sp``), the same share in every layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.calibration.engine import Handle, capture_layer_inputs, to_device
from pruning.calibration.observers import InputNormCollector
from pruning.criteria.base import Importance, layer_structure_scores
from pruning.families import KINDS, OwnedSlice
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_layer_plan

from .common import (
    Notes,
    count_params,
    describe,
    method_notes,
    output_projection,
    uniform_counts,
    uniform_notes,
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
    m = describe(model)
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
            paths = [output_projection(m.adapter, layer, m.head_dim, kind).path for kind in KINDS]
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
    return method_notes(
        "wanda_sp_uniform",
        model,
        before,
        ratio,
        PruningPlan(layers=tuple(layer_plans), criterion="wanda_sp_uniform"),
        calibration="sequential: each layer measured on the pruned layers' outputs, as FLAP's prune_wanda_sp",
        **uniform_notes(counts, m.costs),
    )
