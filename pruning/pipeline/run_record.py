"""``run.json``: what a run did, enough to reproduce it and to check it, and the manifest of its files.

The manifest (``files``: every file the run wrote, relative path -> size and mtime_ns) is what
lets a later run with ``overwrite: true`` remove exactly this run's files and nothing else
(``pruning.rundir.target``).
"""

from __future__ import annotations

import logging
import platform
import resource
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pruning.hooks.context import PipelineContext
from pruning.rundir.target import ANALYSIS_SUBDIR, CHECKPOINT_SUBDIR, MANIFEST_KEY, PLAN_FILE, RUN_RECORD

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: files hold a stamp (size, mtime_ns), not a size


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` where Linux has it: ``ru_maxrss`` carries the
    forking process's peak across ``exec``, so a run started from a big process (a test suite, a
    notebook) would report that process's memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _versions() -> dict[str, str]:
    return package_versions(("pruning", "torch", "transformers", "safetensors", "accelerate"))


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's version and each package's ("not installed" when it is not)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_revision(root: Path) -> str | None:
    """The checkout's short sha (``+ uncommitted changes`` when dirty); None outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _ratio(removed: int, before: int) -> float | None:
    return removed / before if before else None


def build_run_record(
    context: PipelineContext, started: datetime, target: Path, files: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """The record of a finished run; paths name where the outputs are published (``target``)."""
    import torch

    config = context.config
    before, after = context.params_before, context.params_after
    layers_before, layers_after = context.layer_params_before, context.layer_params_after
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    has_analysis = any(name.startswith(f"{ANALYSIS_SUBDIR}/") for name in files)
    return {
        "report_type": "run_record",
        "schema_version": SCHEMA_VERSION,
        "name": config.name,
        "config_file": config.source_file,
        "config": config.to_dict(),
        "model_path": context.model_path,
        "seed": config.calibration.seed,
        "versions": _versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings_s": dict(context.timings),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": None if gpu_peak is None else round(gpu_peak, 1),
        **({"placement": context.placement} if context.placement else {}),
        "params_before": before,
        "params_after": after,
        "params_removed": before - after,
        "achieved_ratio": _ratio(before - after, before),
        "target_ratio": config.pruning.ratio,
        "ratio_of": config.pruning.ratio_of,
        "layer_params_before": layers_before,
        "layer_params_after": layers_after,
        "achieved_layer_ratio": _ratio(layers_before - layers_after, layers_before),
        "outputs": {
            "checkpoint": str(target / CHECKPOINT_SUBDIR),
            "plan": str(target / PLAN_FILE),
            "analysis": str(target / ANALYSIS_SUBDIR) if has_analysis else None,
        },
        MANIFEST_KEY: files,
    }


def log_summary(record: dict[str, Any], target: Path) -> None:
    before, after = record["params_before"], record["params_after"]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items())
    logger.info("=" * 60)
    logger.info("Summary")
    logger.info(
        "  parameters: %s -> %s (removed %s = %.2f%% of all; target %.2f%% of %s)",
        f"{before:,}",
        f"{after:,}",
        f"{before - after:,}",
        100 * record["achieved_ratio"],
        100 * record["target_ratio"],
        record["ratio_of"],
    )
    logger.info("  wall time: %s; total %.1fs", timings, sum(record["timings_s"].values()))
    gpu = f", GPU peak {record['peak_gpu_mb']:,.0f} MB" if record["peak_gpu_mb"] is not None else ""
    logger.info("  peak memory: %s MB resident%s", f"{record['peak_rss_mb']:,.0f}", gpu)
    logger.info("  checkpoint: %s", record["outputs"]["checkpoint"])
    if record["outputs"]["analysis"]:
        logger.info("  reports:    %s", record["outputs"]["analysis"])
    logger.info(
        "  run record: %s (lists the %d files this run wrote)", target / RUN_RECORD, len(record["files"])
    )
