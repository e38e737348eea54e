"""The built-in ``analysis`` hook: what pruning removed, as validated JSON reports and a logged table."""

from __future__ import annotations

import logging
from typing import Any

from pruning import reports
from pruning.analysis import ModelAnalyzer, ModelComparator
from pruning.analysis.text_report import LABELS
from pruning.context import PipelineContext
from pruning.hooks.base import Hook

logger = logging.getLogger(__name__)

# Fields that legitimately differ between an in-memory and an on-disk analysis of the same model.
_PROVENANCE = ("source", "model_name")


class AnalysisHook(Hook):
    """Snapshots the original model's analysis (counts, a few KB; never weights) and reports the change.

    Params: ``lang`` (``en`` or ``zh``), ``verbose`` (per-layer lines in the log). Reports go to
    ``<output dir>/analysis/``, a name the overwrite check knows as a run's own.
    """

    subdir = "analysis"

    def __init__(self, lang: str = "en", verbose: bool = True) -> None:
        if lang not in LABELS:
            raise ValueError(f"lang must be one of {sorted(LABELS)}, got {lang!r}")
        self.lang, self.verbose = lang, bool(verbose)
        self.original: dict[str, Any] | None = None
        self.pruned: dict[str, Any] | None = None

    def before_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Analyse the untouched model."""
        self.original = ModelAnalyzer(context.model, _original_name(context)).analyze()

    def after_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Write the three reports (each validated first) and log the comparison."""
        if self.original is None:
            raise RuntimeError("after_prune fired without before_prune")
        self.pruned = ModelAnalyzer(context.model, _pruned_name(context)).analyze()
        comparator = ModelComparator(self.original, self.pruned)
        out = context.output_dir / self.subdir
        written = [
            reports.save(self.original, out / "original_model_analysis.json"),
            reports.save(self.pruned, out / "pruned_model_analysis.json"),
            comparator.save_report(out / "model_comparison.json"),
        ]
        logger.info("\n%s", comparator.format_report(verbose=self.verbose, lang=self.lang))
        for path in written:
            logger.info("  saved %s", path)

    def after_save(self, context: PipelineContext, **kwargs: Any) -> None:
        """Analyse the checkpoint from disk (headers only) and fail if it differs from memory."""
        if self.pruned is None or context.checkpoint_dir is None:
            raise RuntimeError("after_save fired without after_prune or without a checkpoint")
        on_disk = ModelAnalyzer(context.checkpoint_dir, _pruned_name(context)).analyze()
        differences = _differences(self.pruned, on_disk)
        if differences:
            raise RuntimeError(f"saved checkpoint differs from the pruned model in memory: {differences[:5]}")
        logger.info(
            "  checkpoint on disk matches the in-memory analysis (%s parameters)",
            f"{on_disk['total_params']:,}",
        )


def _original_name(context: PipelineContext) -> str:
    return context.model_path.rstrip("/").rsplit("/", 1)[-1] or context.config.name


def _pruned_name(context: PipelineContext) -> str:
    return f"{_original_name(context)} pruned ({context.config.name})"


def _differences(a: dict[str, Any], b: dict[str, Any], path: str = "$") -> list[str]:
    """JSON paths where two reports differ, ignoring provenance fields at the top level."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - (set(_PROVENANCE) if path == "$" else set())
        return [d for k in sorted(keys) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
