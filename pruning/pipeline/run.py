"""load -> tokenize -> score -> plan -> prune -> save, emitting lifecycle events to the hooks.

``prepare`` runs every check that needs no weights (``pruning.pipeline.preflight``) and builds the
hooks; ``run_pipeline`` sequences the stages inside a ``StagedRun`` (locked output directory, private
staging copy, published by renames only when the run is complete: see ``pruning.rundir.staging``),
times them and fires events. Data flows one way: config -> pipeline -> (model, plan) -> hooks.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pruning import reports
from pruning.config import PipelineConfig
from pruning.criteria.registry import CRITERIA, config_options
from pruning.errors import UserError
from pruning.hooks import Event, HookRunner
from pruning.hooks.context import PipelineContext
from pruning.pipeline.preflight import (
    check_before_loading,
    local_source,
    needs_calibration_text,
    why_not_streamed,
)
from pruning.pipeline.run_record import build_run_record, log_summary
from pruning.rundir.staging import StagedRun
from pruning.rundir.target import CHECKPOINT_SUBDIR, PLAN_FILE, RUN_RECORD, build_manifest
from pruning.source.loading import load_model_and_tokenizer
from pruning.storage.fs import DISK_ERRNOS, disk_errno

logger = logging.getLogger(__name__)

STAGES = ("load", "tokenize", "score", "plan", "prune", "save")


@contextmanager
def stage(context: PipelineContext, name: str, heading: str) -> Iterator[None]:
    """Log a step heading and record the stage's wall time."""
    logger.info("[%d/%d] %s", STAGES.index(name) + 1, len(STAGES), heading)
    start = time.perf_counter()
    try:
        yield
    finally:
        context.timings[name] = round(time.perf_counter() - start, 3)


def prepare(config: PipelineConfig, *, dry_run: bool = False) -> tuple[PipelineContext, HookRunner]:
    """Every check that needs no weights (``check_before_loading``), then the hooks, built before any
    weight is read so that a typo in their params fails in a second."""
    model_path, target = check_before_loading(config, dry_run=dry_run)
    hooks = HookRunner.from_config(config.hooks)
    context = PipelineContext(config=config, output_dir=target, published_dir=target, model_path=model_path)
    return context, hooks


@contextmanager
def disk_errors_named(target: Path) -> Iterator[None]:
    """A full disk, a size limit or a read-only directory is reported in one line, not as a traceback."""
    try:
        yield
    except UserError:
        raise  # already says what is wrong (a hook's failure names the hook, whatever its cause)
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise UserError(
            f"output.dir {target}: {DISK_ERRNOS[code]} ({errno.errorcode[code]}) while writing the run; "
            f"nothing was published and {target} is as it was"
        ) from e


def run_pipeline(config: PipelineConfig) -> PipelineContext:
    """Run the whole job; returns the final context (model, plan, timings, checkpoint_dir)."""
    started = datetime.now(timezone.utc)
    context, hooks = prepare(config)
    target = context.published_dir
    with disk_errors_named(target), StagedRun(target, config.output.overwrite, context.model_path) as run:
        context.output_dir = run.staging
        run_stages(context, hooks)
        record = build_run_record(context, started, target, build_manifest(run.staging))
        reports.save(record, run.staging / RUN_RECORD)
        run.publish()
    context.output_dir, context.checkpoint_dir = target, target / CHECKPOINT_SUBDIR
    log_summary(record, target)
    return context


def run_stages(context: PipelineContext, hooks: HookRunner) -> None:
    """The stages and their events; everything is written under ``context.output_dir``."""
    import torch

    from pruning.calibration.data import mixed_windows
    from pruning.checkpoint.save import save_pruned_model
    from pruning.pipeline.prune_step import prune, prune_heading
    from pruning.planning.planner import plan_global
    from pruning.planning.rounding import KeptShape

    config = context.config
    cal, prn = config.calibration, config.pruning
    torch.manual_seed(cal.seed)
    with stage(
        context, "load", f"Load model {config.model.path} ({config.model.dtype}, {where_it_runs(config)})"
    ):
        path = local_source(config.model, context.model_path)
        loaded = load_model_and_tokenizer(config.model, path, why_not_streamed(config))
        context.model, context.tokenizer, context.layer_store = loaded.model, loaded.tokenizer, loaded.store
        streamed = loaded.placement.streamed
        context.placement = {
            "streamed": streamed,
            "reason": loaded.placement.reason,
            "parts": dict(loaded.placement.parts),
        }
        context.params_before, context.layer_params_before = _count(context.model)
    hooks.emit(Event.BEFORE_PRUNE, context)

    criterion = CRITERIA.build_offered(prn.importance, {**config_options(config), "store": loaded.store})
    windows = None
    with stage(context, "tokenize", f"Calibration windows: {cal.num_samples} x {cal.seq_len} tokens"):
        if needs_calibration_text(config):
            mix = [(s.source, s.weight) for s in cal.mix()]
            windows = mixed_windows(mix, context.tokenizer, cal.num_samples, cal.seq_len, cal.seed)
    how = f", {cal.engine.replace('_', ' ')}" if "engine" in CRITERIA.options(prn.importance) else ""
    with stage(context, "score", f"Run the windows through the model and score ({prn.importance}{how})"):
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
            shape=KeptShape(prn.uniform, prn.multiple_of, prn.heads_multiple_of),
        )
    checkpoint = context.output_dir / CHECKPOINT_SUBDIR
    with stage(context, "prune", prune_heading(config, streamed)):
        weights_dir = prune(context, windows, streamed, checkpoint)
        context.params_after, context.layer_params_after = _count(context.model)
    hooks.emit(Event.AFTER_PRUNE, context)

    with stage(context, "save", f"Save the checkpoint (published to {context.published_dir} when complete)"):
        reports.save(context.plan.to_dict(), context.output_dir / PLAN_FILE)
        context.checkpoint_dir = save_pruned_model(
            context.model,
            context.tokenizer,
            checkpoint,
            max_shard_size=config.output.max_shard_bytes,
            weights_dir=weights_dir,
        )
    hooks.emit(Event.AFTER_SAVE, context)


def where_it_runs(config: PipelineConfig) -> str:
    device_map = config.model.device_map
    return f"device_map {device_map}" if isinstance(device_map, str) else "an explicit device_map"


def _count(model: object) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters)."""
    from pruning.families import adapter_for

    return sum(p.numel() for p in model.parameters()), sum(
        p.numel() for p in adapter_for(model.config).decoder_layers(model).parameters()
    )
