"""load -> calibrate -> score -> plan -> prune -> save, emitting lifecycle events to the hooks.

Each stage is a small function; ``run_pipeline`` only sequences them, times them and fires events.
Data flows one way: config -> pipeline -> (model, plan) -> hooks.
"""

from __future__ import annotations

import logging
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pruning.config import PipelineConfig
from pruning.context import PipelineContext
from pruning.errors import UserError
from pruning.hooks import Event, HookRunner
from pruning.jsonio import write_json_atomic
from pruning.loading import load_model_and_tokenizer, pick_device, resolve_model_path
from pruning.outputs import CHECKPOINT_SUBDIR, PLAN_FILE, RUN_RECORD, check_output_dir, clear_previous_run

logger = logging.getLogger(__name__)

STAGES = ("load", "calibrate", "score", "plan", "prune", "save")


@contextmanager
def stage(context: PipelineContext, name: str, heading: str) -> Iterator[None]:
    """Log a step heading and record the stage's wall time."""
    logger.info("[%d/%d] %s", STAGES.index(name) + 1, len(STAGES), heading)
    start = time.perf_counter()
    try:
        yield
    finally:
        context.timings[name] = round(time.perf_counter() - start, 3)


def prepare(config: PipelineConfig) -> tuple[PipelineContext, HookRunner]:
    """Every check that needs no weights: model path, output dir, hooks. Nothing is written."""
    model_path = resolve_model_path(config.model)
    check_calibration_source(config)
    pick_device(config.model.device)  # a missing GPU fails now, not after the weights are read
    output_dir = Path(config.output.dir)
    check_output_dir(output_dir, config.output.overwrite, model_path)
    hooks = HookRunner.from_config(config.hooks)
    context = PipelineContext(config=config, output_dir=output_dir, model_path=model_path)
    return context, hooks


def check_calibration_source(config: PipelineConfig) -> None:
    """A calibration file that does not exist fails before any weights load."""
    from pruning.data import looks_like_path
    from pruning.importance import CRITERIA

    source = config.calibration.source
    if (
        CRITERIA[config.pruning.importance].needs_data
        and looks_like_path(source)
        and not Path(source).is_file()
    ):
        raise UserError(f"calibration.source: file not found: {source}")


def run_pipeline(config: PipelineConfig) -> PipelineContext:
    """Run the whole job; returns the final context (model, plan, timings, checkpoint_dir)."""
    import torch

    from pruning.checkpoint import save_pruned_model
    from pruning.data import calibration_windows
    from pruning.importance import CRITERIA, get_criterion
    from pruning.planner import plan_global
    from pruning.surgery import apply_plan

    started = datetime.now(timezone.utc)
    context, hooks = prepare(config)
    torch.manual_seed(config.calibration.seed)
    cal, prn = config.calibration, config.pruning
    with stage(
        context, "load", f"Load model {config.model.path} ({config.model.dtype}, {config.model.device})"
    ):
        context.model, context.tokenizer = load_model_and_tokenizer(config.model, context.model_path)
        context.params_before, context.layer_params_before = _count(context.model)
    hooks.emit(Event.BEFORE_PRUNE, context)

    needs_data = CRITERIA[prn.importance].needs_data
    criterion = get_criterion(prn.importance, **({"batch_size": cal.batch_size} if needs_data else {}))
    windows = None
    with stage(context, "calibrate", f"Calibration windows: {cal.num_samples} x {cal.seq_len} tokens"):
        if needs_data:
            windows = calibration_windows(
                cal.source, context.tokenizer, cal.num_samples, cal.seq_len, cal.seed
            )
    with stage(context, "score", f"Score heads and channels ({prn.importance})"):
        scores = criterion.score(context.model, windows)
    with stage(context, "plan", f"Plan: remove {prn.ratio:.2%} of {prn.ratio_of} parameters, globally"):
        context.plan = plan_global(
            context.model,
            scores,
            prn.ratio,
            prn.ratio_of,
            prn.protected_layers,
            prn.min_kv_groups,
            prn.min_channels,
            criterion=prn.importance,
        )
    with stage(context, "prune", "Remove the planned structures"):
        apply_plan(context.model, context.plan)
        context.params_after, context.layer_params_after = _count(context.model)
    clear_previous_run(context.output_dir)  # only now: a run that fails earlier leaves the old one intact
    hooks.emit(Event.AFTER_PRUNE, context)

    with stage(context, "save", f"Save to {context.output_dir / CHECKPOINT_SUBDIR}"):
        write_json_atomic(context.output_dir / PLAN_FILE, context.plan.to_dict())
        context.checkpoint_dir = save_pruned_model(
            context.model, context.tokenizer, context.output_dir / CHECKPOINT_SUBDIR
        )
    hooks.emit(Event.AFTER_SAVE, context)

    record = run_record(context, started)
    write_json_atomic(context.output_dir / RUN_RECORD, record)
    log_summary(context, record)
    return context


def _count(model: Any) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters)."""
    from pruning.architectures import decoder_layers

    return sum(p.numel() for p in model.parameters()), sum(
        p.numel() for p in decoder_layers(model).parameters()
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("pruning", "torch", "transformers", "torch-pruning", "safetensors", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_record(context: PipelineContext, started: datetime) -> dict[str, Any]:
    """What run.json keeps: enough to reproduce the run and to check its outcome."""
    import torch

    config = context.config
    before, after = context.params_before, context.params_after
    layers_before, layers_after = context.layer_params_before, context.layer_params_after
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
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
        "params_before": before,
        "params_after": after,
        "params_removed": before - after,
        "achieved_ratio": (before - after) / before if before else None,
        "target_ratio": config.pruning.ratio,
        "ratio_of": config.pruning.ratio_of,
        "layer_params_before": layers_before,
        "layer_params_after": layers_after,
        "achieved_layer_ratio": (layers_before - layers_after) / layers_before if layers_before else None,
        "outputs": {
            "checkpoint": str(context.checkpoint_dir),
            "plan": str(context.output_dir / PLAN_FILE),
            "analysis": str(context.output_dir / "analysis")
            if (context.output_dir / "analysis").is_dir()
            else None,
        },
    }


def log_summary(context: PipelineContext, record: dict[str, Any]) -> None:
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
    logger.info("  run record: %s", context.output_dir / RUN_RECORD)
