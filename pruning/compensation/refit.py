"""Compensation: after a block loses structures, refit its output projection so that it still writes
what the dense block wrote.

Removing KV groups or MLP channels leaves the kept ones computing exactly what they did; only the
output projection's sum loses terms. So the output projection's kept columns are refit by ridge least
squares, ``W' = argmin ||W' X_K - W X||^2 + lambda ||W'||^2 = W G[:, K] (G[K, K] + lambda I)^-1``, with
``G = X X^T`` the Gram matrix of the projection's input over every calibration token and ``lambda`` a
share (``ridge``) of G[K, K]'s mean diagonal. ``X`` is what the block receives on the *pruned* path
(every earlier layer already pruned and refit), and the target is what the dense block makes of that
same input: each layer repairs its own loss without chasing the drift of earlier layers, which
measured worse on text other than the calibration text (docs/compensation.md).

It runs in the layer-by-layer pass (``pruning.calibration.engine.run_layerwise``'s ``change``):
attention first,
then the MLP on the refit attention's outputs, then the layer runs to feed the next one. Only one
layer's Gram matrices are alive at a time (``intermediate_size``^2 floats for the MLP).

``selection="obs"`` keeps how many structures the plan takes from each block but re-chooses which:
greedy OBS (``pruning.compensation.obs``) on the Gram matrix the refit uses, so the choice sees the pruned
path's
inputs and the refit that follows. That needs a block with one output projection, as in every family
here; a block with several keeps the plan's choice. The returned plan records what was removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pruning.calibration.engine import Handle, KnownOutputs, LayerReplay, LayerStore, run_layerwise
from pruning.calibration.observers import GramCollector
from pruning.compensation.obs import STEPS, column_blocks, greedy_removal
from pruning.families import ATTENTION, KINDS, MLP, OwnedSlice, adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_layer_plan


def ridge_refit(weight: torch.Tensor, gram: torch.Tensor, keep: Sequence[int], ridge: float) -> torch.Tensor:
    """The kept columns ``keep`` of ``weight`` refit so that ``W' x[keep]`` best matches ``W x`` over the
    inputs whose Gram matrix is ``gram`` (float64 solve; returned in the weight's dtype and device)."""
    g = gram.double()
    kept = torch.as_tensor(keep, dtype=torch.long, device=g.device)
    a = g.index_select(0, kept).index_select(1, kept)
    damp = ridge * float(a.diagonal().mean()) if a.numel() else 0.0
    a.diagonal().add_(max(damp, 1e-12))
    rhs = g.index_select(1, kept).T @ weight.detach().to(g.device, torch.float64).T  # [K, out]
    solution = torch.linalg.solve(a, rhs).T  # a is symmetric: (W G[:, K]) a^-1
    return solution.to(weight.device, weight.dtype)


# compensation.selection: keep the plan's choice, or re-choose each block's removals by greedy OBS
PLAN_SELECTION, OBS_SELECTION = "plan", "obs"
# compensation.inputs: what each block is refit on, the pruned model's activations or the dense model's
PRUNED_INPUTS, DENSE_INPUTS = "pruned", "dense"


@dataclass
class Refit:
    """The pruning pass's ``change``: prune each layer block by block, refitting each block's output
    projections on the pruned path's inputs."""

    model: nn.Module
    plan: PruningPlan
    ridge: float = 1e-3
    done: Callable[[nn.Module], None] | None = None  # called with each layer once it is final
    selection: str = (
        PLAN_SELECTION  # or OBS_SELECTION: which structures of each block go is re-chosen (module docstring)
    )
    obs_steps: int = STEPS  # the greedy's updates per block, with OBS_SELECTION
    removed: dict[int, LayerPlan] = field(default_factory=dict)  # per layer, what was removed
    _dense_grams: GramCollector | None = field(default=None, init=False, repr=False)

    def realized_plan(self) -> PruningPlan:
        """The plan with what each layer really lost (it differs from ``plan`` only with ``obs``)."""
        layers = tuple(self.removed.get(lp.layer_idx, lp) for lp in self.plan.layers)
        return replace(self.plan, layers=layers, extra={**self.plan.extra, "selection": self.selection})

    def __call__(self, layer_idx: int, layer: nn.Module, replay: LayerReplay) -> KnownOutputs | None:
        """The pruned path (a ``LayerChange``): each block's Gram matrix from a replay of the layer on
        the inputs the already pruned layers produce, stopped at the block's output projection. The
        MLP's replay also keeps its projection's inputs, so the layer's next run need not compute the
        MLP again (``MlpOutputs``)."""
        mlp = MlpOutputs()

        def gram(kind: str, outputs: list[OwnedSlice]) -> GramCollector:
            collector = GramCollector([owned.path for owned in outputs])
            # one output projection: nothing after its input matters to the Gram matrix
            until = layer.get_submodule(outputs[0].path) if len(outputs) == 1 else None
            handles = mlp.capture(layer, outputs) if kind == MLP else []
            try:
                replay([collector], until=until)
            finally:
                for handle in handles:
                    handle.remove()
            return collector

        kept = self._prune_and_refit(layer_idx, layer, gram)
        if self.done is not None:
            self.done(layer)
        return mlp.known(layer, kept)

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        """The dense path (a ``LayerObserver``): the Gram matrices of every block the plan prunes, from
        the one run of the dense layer that also feeds the next layer."""
        adapter = adapter_for(self.model.config)
        geo = adapter.geometry(layer, adapter.head_dim(self.model.config))
        planned = self.plan.layers[layer_idx]
        paths = [
            owned.path
            for kind, removed in ((ATTENTION, planned.remove_kv_groups), (MLP, planned.remove_channels))
            if 0 < len(removed) < geo.count(kind)
            for owned in adapter.owned_slices(kind, geo)
            if owned.axis == 1
        ]
        self._dense_grams = GramCollector(paths)
        return self._dense_grams.watch(layer_idx, layer)

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        collector, self._dense_grams = self._dense_grams, None
        self._prune_and_refit(layer_idx, layer, lambda kind, outputs: collector)
        if self.done is not None:
            self.done(layer)

    def _prune_and_refit(
        self, layer_idx: int, layer: nn.Module, gram: Callable[[str, list[OwnedSlice]], GramCollector]
    ) -> dict[str, list[int]]:
        """Each block pruned and its output projections refit; returns, per refit projection, the
        (dense) indices of the input columns it kept."""
        kept: dict[str, list[int]] = {}
        adapter = adapter_for(self.model.config)
        head_dim = adapter.head_dim(self.model.config)
        planned = self.plan.layers[layer_idx]
        chosen = {ATTENTION: planned.remove_kv_groups, MLP: planned.remove_channels}
        for kind in KINDS:
            geo = adapter.geometry(layer, head_dim)
            removed = chosen[kind]
            if not removed:
                continue
            outputs = [owned for owned in adapter.owned_slices(kind, geo) if owned.axis == 1]
            collector = None
            if len(removed) < geo.count(kind):
                collector = gram(kind, outputs)
                if self.selection == OBS_SELECTION and len(outputs) == 1:
                    removed = chosen[kind] = self._choose(
                        layer, outputs[0], collector, geo.count(kind), len(removed)
                    )
            step = LayerPlan(
                layer_idx,
                geo.num_kv_heads,
                geo.intermediate_size,
                remove_kv_groups=removed if kind == ATTENTION else (),
                remove_channels=() if kind == ATTENTION else removed,
            )
            emptied = step.attention_removed if kind == ATTENTION else step.mlp_removed
            if emptied:  # nothing left to refit
                apply_layer_plan(self.model, step)
                continue
            keep = step.keep_kv_groups if kind == ATTENTION else step.keep_channels
            refits = {
                owned.path: ridge_refit(
                    layer.get_submodule(owned.path).weight,
                    collector.gram[owned.path],
                    owned.indices(keep),
                    self.ridge,
                )
                for owned in outputs
            }
            del collector
            apply_layer_plan(self.model, step)
            with torch.no_grad():
                for path, weight in refits.items():
                    layer.get_submodule(path).weight.copy_(weight)
            kept.update({owned.path: owned.indices(keep) for owned in outputs})
        self.removed[layer_idx] = replace(
            planned, remove_kv_groups=chosen[ATTENTION], remove_channels=chosen[MLP]
        )
        return kept

    def _choose(
        self, layer: nn.Module, owned: OwnedSlice, collector: GramCollector, count: int, how_many: int
    ) -> tuple[int, ...]:
        """As many structures as planned, chosen by greedy OBS on the pruned path's inputs."""
        blocks = column_blocks(owned, count)
        weight = layer.get_submodule(owned.path).weight
        gram = collector.gram[owned.path].to(weight.device)
        order, _ = greedy_removal(weight, gram, blocks, self.ridge, limit=how_many, steps=self.obs_steps)
        return tuple(sorted(order))


class MlpOutputs:
    """The refit MLP's output for every batch, from its projection's inputs kept during the MLP's
    replay: ``down_proj`` on the kept channels of those inputs, with the refit weights, is what the
    pruned MLP computes (gate and up lose only the removed channels). The layer's next run then takes
    these instead of running the MLP again, about a third of the layer's work.

    Used only where the MLP's output is its projection's output, which holds in every family here and
    is checked on the first batch against the MLP's own forward (a plugin family whose MLP does more
    simply runs it)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.inputs: list[torch.Tensor] = []
        self.first_mlp_input: tuple[Any, ...] | None = None

    def capture(self, layer: nn.Module, outputs: Sequence[OwnedSlice]) -> list[Handle]:
        """Hooks that keep the projection's input per batch, and the MLP's own input for the first."""
        if len(outputs) != 1 or "." not in outputs[0].path:
            return []
        self.path = outputs[0].path
        parent = layer.get_submodule(self.path.rsplit(".", 1)[0])

        def keep_first(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.first_mlp_input is None:
                self.first_mlp_input = args

        return [
            parent.register_forward_pre_hook(keep_first),
            layer.get_submodule(self.path).register_forward_pre_hook(
                lambda module, args: self.inputs.append(args[0])
            ),
        ]

    def known(self, layer: nn.Module, kept: dict[str, list[int]]) -> KnownOutputs | None:
        if self.path is None or self.path not in kept or not self.inputs or self.first_mlp_input is None:
            return None  # no MLP replay, or the MLP was emptied
        projection = layer.get_submodule(self.path)
        parent = layer.get_submodule(self.path.rsplit(".", 1)[0])
        index = torch.as_tensor(kept[self.path], dtype=torch.long, device=self.inputs[0].device)
        outputs = [projection(x.index_select(-1, index)) for x in self.inputs]
        self.inputs = []
        own = parent(*self.first_mlp_input)
        if not isinstance(own, torch.Tensor) or own.shape != outputs[0].shape:
            return None
        tolerance = 1e-4 if own.dtype == torch.float32 else 2e-2  # summation order differs, not the terms
        if float((own - outputs[0]).abs().max()) > tolerance * max(float(own.abs().max()), 1e-30):
            return None
        return {parent: outputs}


def prune_with_refit(
    model: nn.Module,
    plan: PruningPlan,
    windows: torch.LongTensor,
    batch_size: int,
    ridge: float = 1e-3,
    store: LayerStore | None = None,
    done: Callable[[nn.Module], None] | None = None,
    selection: str = PLAN_SELECTION,
    obs_steps: int = STEPS,
    inputs: str = PRUNED_INPUTS,
) -> PruningPlan:
    """Apply the plan layer by layer, refitting as it goes (see the module docstring); ``done(layer)``
    hears of each layer once it is final (a streamed run writes it then). Returns what was removed."""
    was_training = model.training
    model.eval()
    try:
        change = Refit(model, plan, ridge, done, selection, obs_steps=obs_steps)
        if inputs == PRUNED_INPUTS:
            run_layerwise(model, windows, batch_size, [], change=change, store=store)
        else:  # each layer runs dense, feeding the next, and is pruned and refit once it has
            run_layerwise(model, windows, batch_size, [change], store=store)
    finally:
        model.train(was_training)
    return change.realized_plan()
