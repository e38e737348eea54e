"""The built-in ``analysis`` hook: what pruning removed, as validated JSON reports and a logged table."""

from __future__ import annotations

import logging
from typing import Any

from pruning import reports
from pruning.analysis import ModelAnalyzer, ModelComparator
from pruning.analysis.text_report import LABELS
from pruning.hooks.base import Hook
from pruning.hooks.context import PipelineContext

logger = logging.getLogger(__name__)


class AnalysisHook(Hook):
    """Snapshots the original model's analysis (counts, a few KB; never weights) and reports the change.

    Params: ``lang`` (``en`` or ``zh``), ``verbose`` (per-layer lines in the log). Reports go to
    ``<output dir>/analysis/``. That the checkpoint on disk matches the model is checked by the saving
    code itself (``pruning.checkpoint.save.verify_saved``), so it holds without this hook.
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
        published = context.published_dir or context.output_dir
        for path in written:  # shown where they appear once the run is complete and published
            logger.info("  wrote %s", published / self.subdir / path.name)


def _original_name(context: PipelineContext) -> str:
    return context.model_path.rstrip("/").rsplit("/", 1)[-1] or context.config.name


def _pruned_name(context: PipelineContext) -> str:
    return f"{_original_name(context)} pruned ({context.config.name})"
