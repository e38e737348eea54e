"""Global structured pruning for decoder LLMs (the families in pruning.families), with exact reports."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_pruned_model(path: Any, **kwargs: Any) -> Any:
    """Rebuild a pruned checkpoint (safetensors + per-layer shapes in config.json).

    See ``pruning.checkpoint.load``."""
    from pruning.checkpoint.load import load_pruned_model as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load_pruned_model"]
