"""ModelComparator: what pruning removed, overall and per layer, from two analysis reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pruning import reports
from pruning.analysis.text_report import format_comparison
from pruning.errors import UserError

SCHEMA_VERSION = 1


def delta(original: int, pruned: int) -> dict[str, Any]:
    """``{original, pruned, reduced, reduction_ratio}``; the ratio is None when nothing was there."""
    reduced = original - pruned
    return {
        "original": original,
        "pruned": pruned,
        "reduced": reduced,
        "reduction_ratio": reduced / original if original else None,
    }


class ModelComparator:
    """Compares two analysis reports (from ``ModelAnalyzer.analyze()``) layer by layer."""

    def __init__(
        self,
        original_analysis: dict[str, Any],
        pruned_analysis: dict[str, Any],
        original_name: str | None = None,
        pruned_name: str | None = None,
    ) -> None:
        self.original = original_analysis
        self.pruned = pruned_analysis
        self.original_name = original_name or original_analysis.get("model_name", "original")
        self.pruned_name = pruned_name or pruned_analysis.get("model_name", "pruned")
        self.result: dict[str, Any] | None = None

    def compare(self) -> dict[str, Any]:
        """Build (once) and return the comparison report; valid against model_comparison.schema.json."""
        if self.result is None:
            self.result = self._compare()
        return self.result

    def _compare(self) -> dict[str, Any]:
        orig_layers, pruned_layers = self.original["layers"], self.pruned["layers"]
        if len(orig_layers) != len(pruned_layers):
            raise UserError(
                f"cannot compare models with different layer counts: {self.original_name!r} has "
                f"{len(orig_layers)} layers, {self.pruned_name!r} has {len(pruned_layers)}"
            )
        layers = [_compare_layer(o, p) for o, p in zip(orig_layers, pruned_layers, strict=True)]
        return {
            "report_type": "model_comparison",
            "schema_version": SCHEMA_VERSION,
            "original_name": self.original_name,
            "pruned_name": self.pruned_name,
            "total_params": delta(self.original["total_params"], self.pruned["total_params"]),
            "layer_params": delta(
                self.original["layer_summary"]["total_layer_params"],
                self.pruned["layer_summary"]["total_layer_params"],
            ),
            "layers": layers,
            "zero_layers": [layer["layer_idx"] for layer in layers if layer["is_zero_layer"]],
        }

    def format_report(self, verbose: bool = False, lang: str = "en") -> str:
        return format_comparison(self.compare(), verbose=verbose, lang=lang)

    def print_report(self, verbose: bool = False, lang: str = "en") -> None:
        """Write the text report to standard output (per-layer details only when verbose)."""
        print(self.format_report(verbose=verbose, lang=lang))

    def save_report(self, path: str | os.PathLike[str]) -> Path:
        """Validate against the schema, then write atomically."""
        return reports.save(self.compare(), path)


def _compare_layer(orig: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    oa, pa, om, pm = orig["attention"], pruned["attention"], orig["mlp"], pruned["mlp"]
    return {
        "layer_idx": orig["layer_idx"],
        "total": delta(orig["total"], pruned["total"]),
        "attention": delta(oa["total"], pa["total"])
        | {
            "num_heads": {"original": oa["num_heads"], "pruned": pa["num_heads"]},
            "num_kv_heads": {"original": oa["num_kv_heads"], "pruned": pa["num_kv_heads"]},
        },
        "mlp": delta(om["total"], pm["total"])
        | {"intermediate_size": {"original": om["intermediate_size"], "pruned": pm["intermediate_size"]}},
        "is_zero_layer": pruned["is_zero_layer"],
    }
