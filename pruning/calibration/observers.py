"""Statistics observers of the calibration engine, shared by criteria and compensation.

Each is a ``LayerObserver`` (``pruning.calibration.engine``): it registers hooks on a decoder layer
while the windows run through it and keeps a few vectors or matrices per watched module, never the
activations themselves. ``InputNormCollector`` keeps each input feature's sum of squares (the
activation criterion's energy, the residual stream's scale); ``GramCollector`` keeps ``X X^T`` of a
projection's inputs (what a refit and the OBS errors solve with).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pruning.calibration.engine import Handle

# InputNormCollector's key for a decoder layer's own input: the residual stream.
RESIDUAL = "residual"


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


class GramCollector:
    """Observer: the Gram matrix ``X X^T`` (fp32) of the inputs of some modules of one layer."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.gram: dict[str, torch.Tensor] = {}

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        return [layer.get_submodule(path).register_forward_pre_hook(self._hook(path)) for path in self.paths]

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        pass

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.T @ x
            if path in self.gram:
                self.gram[path] += gram
            else:
                self.gram[path] = gram

        return hook
