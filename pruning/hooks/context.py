"""The one object hooks receive: everything a run knows at the moment an event fires."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.config import PipelineConfig
from pruning.planning.plan import PruningPlan


@dataclass
class PipelineContext:
    """Shared state of one run. Hooks read it; only the pipeline changes it.

    ``model`` is untouched at ``before_prune``, pruned in memory at ``after_prune`` (``plan`` set), and
    saved at ``after_save`` (``checkpoint_dir`` set). ``timings`` maps stage name to seconds.

    ``output_dir`` is where the run writes *now*: during the run a private staging directory, whose whole
    content (hooks' files included) appears in ``published_dir`` (``output.dir``) only when the run is
    complete. Hooks write under ``output_dir`` and report ``published_dir`` to users.
    """

    config: PipelineConfig
    output_dir: Path
    published_dir: Path | None = None
    model: Any = None
    tokenizer: Any = None
    model_path: str = ""
    plan: PruningPlan | None = None
    checkpoint_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    # where the model's layer weights are for a pass (pruning.calibration.engine.LayerStore): resident,
    # or read from the source before pruning and from the written shards after it when the run streams
    layer_store: Any = None  # streamed, reason, parts: where each part lived
    params_before: int = 0
    params_after: int = 0
    layer_params_before: int = 0
    layer_params_after: int = 0
