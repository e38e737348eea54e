"""The ``refit_error`` criterion: what a structure's removal costs once the refit has done its work.

The activation criterion charges a structure the energy it writes, ``||W[:, S]||^2 E[x_S^2]`` per
column, as if nothing could replace it. Compensation (``pruning.compensation.refit``) refits the output
projection's kept columns, and a structure whose inputs the others can reproduce costs almost nothing
after that. For one structure S with the rest kept, the error left after the best refit is the
optimal-brain-surgeon form ``tr(W_S [H^-1]_SS^-1 W_S^T)`` with ``H = E[x x^T]`` the (damped) second
moment of the projection's inputs; with uncorrelated inputs it reduces exactly to the activation
score. Scores are divided by the residual stream's typical energy at the layer, as the activation
criterion's are, so one global ranking compares all layers and both block types (its docstring gives
why the median is used), and Gemma's post-norms weight output rows the same way.

Memory: one layer's Gram matrices at a time with the ``layerwise`` engine; ``whole_model`` keeps every
layer's until the forward ends (about 17 GB for Llama-2-7B), so use ``layerwise`` with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pruning.calibration.engine import Handle, LayerStore, calibrate
from pruning.calibration.observers import RESIDUAL, GramCollector, InputNormCollector
from pruning.compensation.obs import block_errors, column_blocks
from pruning.criteria.base import Criterion, layers_in_order
from pruning.families import KINDS, OwnedSlice, adapter_for
from pruning.planning.scores import StructureScores


def removal_errors(
    weight: torch.Tensor, second_moment: torch.Tensor, blocks: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Per block of columns (``blocks``: [structures, width] column indices), the output error
    ``tr(W_S [H^-1]_SS^-1 W_S^T)`` left by removing it and refitting the other columns optimally."""
    h = second_moment.double()
    damp = max(ridge * float(h.diagonal().mean()), 1e-12)  # a dead input (all-zero Gram) stays solvable
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    idx = blocks.to(h.device)
    h_ss = h_inv[idx[:, :, None], idx[:, None, :]]  # [structures, width, width]
    w_s = weight.detach().to(h.device, torch.float64)[:, idx].permute(1, 0, 2)  # [structures, out, width]
    return block_errors(w_s, h_ss).float().cpu()


# (weight, second moment, blocks, ridge) -> one error per block
Errors = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class RefitErrorObserver:
    """Gathers each layer's output-projection Gram matrices and residual energy; scores the layer as
    soon as every window has been through it, then drops them."""

    def __init__(
        self,
        model: nn.Module,
        ridge: float,
        errors: Errors = removal_errors,
        row_weights: dict[tuple[int, str], torch.Tensor] | None = None,
    ) -> None:
        """``row_weights``: per (layer, projection path), a weight per output row
        (``pruning.calibration.fisher``) that replaces the residual-energy normalisation and the
        post-norm weighting."""
        self.adapter = adapter_for(model.config)
        self.head_dim = self.adapter.head_dim(model.config)
        self.num_layers = len(self.adapter.decoder_layers(model))
        self.ridge = ridge
        self.errors = errors
        self.row_weights = row_weights
        self.norms = InputNormCollector()
        self.grams: dict[int, GramCollector] = {}
        self.attention: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}

    def _outputs(self, layer: nn.Module) -> Iterator[tuple[str, int, OwnedSlice]]:
        geo = self.adapter.geometry(layer, self.head_dim)
        for kind in KINDS:
            if geo.count(kind):
                for owned in self.adapter.owned_slices(kind, geo):
                    if owned.axis == 1:
                        yield kind, geo.count(kind), owned

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        outputs = list(self._outputs(layer))
        self.grams[layer_idx] = GramCollector([owned.path for _, _, owned in outputs])
        norm_paths = [
            norm for norm in {self.adapter.output_norm(kind) for kind, _, _ in outputs} if norm is not None
        ]
        return self.grams[layer_idx].watch(layer_idx, layer) + self.norms.attach(layer_idx, layer, norm_paths)

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        grams = self.grams.pop(layer_idx)
        residual_per_dim = self.norms.mean_square(layer_idx, RESIDUAL)
        residual = float(residual_per_dim.median()) * residual_per_dim.numel()
        tokens = self.norms.rows[(layer_idx, RESIDUAL)]
        totals = {
            kind: torch.zeros(self.adapter.geometry(layer, self.head_dim).count(kind)) for kind in KINDS
        }
        for kind, count, owned in self._outputs(layer):
            weight = layer.get_submodule(owned.path).weight.detach().float()
            scale = residual
            norm_path = self.adapter.output_norm(kind)
            if self.row_weights is not None:  # the loss's own weights: one scale for all layers
                weight = weight * self.row_weights[(layer_idx, owned.path)].to(weight.device).sqrt()[:, None]
                scale = 1.0
            elif norm_path is not None:
                # what reaches the stream through a post-norm (see ActivationCriterion)
                gain = self.adapter.norm_gain(layer.get_submodule(norm_path)).float().to(weight.device)
                block_out = float(self.norms.mean_square(layer_idx, norm_path).mean())
                weight = weight * (gain / block_out**0.5)[:, None]
            blocks = column_blocks(owned, count)
            gram = grams.gram[owned.path] / tokens
            totals[kind] += self.errors(weight, gram, blocks, self.ridge) / scale
        self.attention[layer_idx], self.mlp[layer_idx] = (totals[kind] for kind in KINDS)
        self.norms.forget(layer_idx)

    def scores(self) -> StructureScores:
        return layers_in_order(self.attention, self.mlp, self.num_layers)


@dataclass
class RefitErrorCriterion(Criterion):
    """Score each KV group and MLP channel by the error its removal leaves after an optimal refit."""

    name: ClassVar[str] = "refit_error"
    batch_size: int = 1
    engine: str = "layerwise"
    store: LayerStore | None = None
    ridge: float = 1e-3

    def error_function(self) -> Errors:
        """(weight, second moment, blocks, ridge) -> one error per block: what this criterion charges."""
        return removal_errors

    def score(self, model: nn.Module, windows: torch.LongTensor | None) -> StructureScores:
        observer = RefitErrorObserver(model, self.ridge, self.error_function())
        calibrate(model, windows, self.batch_size, [observer], self.engine, self.store)
        return observer.scores()
