"""load -> tokenize -> score -> plan -> prune -> save, emitting lifecycle events to the hooks.

``prepare`` does every check that needs no weights; ``run_pipeline`` sequences the stages inside a
``StagedRun`` (locked output directory, private staging copy, published by renames only when the run
is complete: see ``pruning.staging``), times them and fires events.
Data flows one way: config -> pipeline -> (model, plan) -> hooks.
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
from pruning.context import PipelineContext
from pruning.errors import UserError
from pruning.fsutil import DISK_ERRNOS, disk_errno
from pruning.hooks import Event, HookRunner
from pruning.loading import check_source_weights, load_model_and_tokenizer, resolve_model_path
from pruning.outputs import (
    CHECKPOINT_SUBDIR,
    PLAN_FILE,
    RUN_RECORD,
    build_manifest,
    check_output_dir,
    check_writable,
    resolve_target,
)
from pruning.placement import check_devices
from pruning.preflight import (
    check_file_size_limit,
    check_run,
    estimate_output_bytes,
    model_facts,
    read_model_config,
)
from pruning.run_record import build_run_record, log_summary
from pruning.staging import StagedRun

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
    """Every check that needs no weights: model config and files, run vs model, output dir, disk, hooks.

    Nothing is written (a built-in model is downloaded to its cache on first use). A dry run accepts a
    model directory that holds only config.json (to plan a run on a machine without the weights).
    """
    from pruning.importance import CRITERIA

    model_path = resolve_model_path(config.model)
    facts = model_facts(read_model_config(model_path))
    check_run(config, facts, CRITERIA[config.pruning.importance].needs_data)
    check_source_weights(model_path, facts.config, config.model.trust_pickle, require=not dry_run)
    check_calibration_source(config)
    check_devices(config.model)  # a missing GPU fails now, not after the weights are read
    target = resolve_target(config.output.dir)
    check_output_dir(target, config.output.overwrite, model_path)
    needed, largest_file = estimate_output_bytes(config, facts, model_path)
    check_writable(target, needed)
    check_file_size_limit(target, largest_file)
    hooks = HookRunner.from_config(config.hooks)
    context = PipelineContext(config=config, output_dir=target, published_dir=target, model_path=model_path)
    return context, hooks


def check_calibration_source(config: PipelineConfig) -> None:
    """A calibration file that does not exist fails before any weights load."""
    from pruning.data import looks_like_path
    from pruning.importance import CRITERIA
    from pruning.texts import NAMES, PREFIX, is_builtin

    cal = config.calibration
    if not (CRITERIA[config.pruning.importance].needs_data or config.compensation.method == "refit"):
        return
    key = "calibration.sources" if cal.sources else "calibration.source"
    for item in cal.mix():
        source = item.source
        if is_builtin(source) and source.removeprefix(PREFIX) not in NAMES:
            known = ", ".join(PREFIX + name for name in NAMES)
            raise UserError(f"{key}: unknown built-in text {source!r}: known are {known}")
        if not is_builtin(source) and looks_like_path(source) and not Path(source).is_file():
            raise UserError(f"{key}: file not found: {source}")


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

    from pruning.checkpoint import partial_dir, save_pruned_model
    from pruning.compensation import prune_with_refit
    from pruning.data import mixed_windows
    from pruning.importance import CRITERIA, get_criterion
    from pruning.kept_shape import KeptShape
    from pruning.planner import plan_global
    from pruning.streaming import prune_and_write
    from pruning.surgery import apply_plan

    config = context.config
    cal, prn = config.calibration, config.pruning
    torch.manual_seed(cal.seed)
    with stage(
        context, "load", f"Load model {config.model.path} ({config.model.dtype}, {where_it_runs(config)})"
    ):
        loaded = load_model_and_tokenizer(config.model, context.model_path, _why_not_streamed(config))
        context.model, context.tokenizer, store = loaded.model, loaded.tokenizer, loaded.store
        context.layer_store = store
        streamed = loaded.placement.streamed
        context.placement = {
            "streamed": streamed,
            "reason": loaded.placement.reason,
            "parts": dict(loaded.placement.parts),
        }
        context.params_before, context.layer_params_before = _count(context.model)
    hooks.emit(Event.BEFORE_PRUNE, context)

    criterion = get_criterion(prn.importance, **_criterion_options(config, store))
    refit = config.compensation.method == "refit"
    needs_data = CRITERIA[prn.importance].needs_data or refit
    windows = None
    with stage(context, "tokenize", f"Calibration windows: {cal.num_samples} x {cal.seq_len} tokens"):
        if needs_data:
            mix = [(s.source, s.weight) for s in cal.mix()]
            windows = mixed_windows(mix, context.tokenizer, cal.num_samples, cal.seq_len, cal.seed)
    how = f", {cal.engine.replace('_', ' ')}" if hasattr(criterion, "engine") else ""
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
    weights_dir = None
    heading = "Remove the planned structures" + (", layer by layer, writing each layer" if streamed else "")
    if refit:
        heading += f", refitting each block's output projections (ridge {config.compensation.ridge:g})"
        if config.compensation.selection == "obs":
            heading += ", each block's removals re-chosen by greedy OBS"

    def pruning_pass(layers: object, done: object = None) -> None:
        comp = config.compensation
        context.plan = prune_with_refit(
            context.model, context.plan, windows, cal.batch_size, comp.ridge, layers, done, comp.selection
        )

    with stage(context, "prune", heading):
        if streamed:
            weights_dir = partial_dir(checkpoint)
            prune_and_write(
                context.model,
                context.plan,
                store,
                weights_dir,
                config.output.max_shard_bytes,
                pruning_pass if refit else None,
            )
            context.layer_store = store.reading(weights_dir)  # hooks evaluate the pruned layers from there
        elif refit:
            pruning_pass(store)
        else:
            apply_plan(context.model, context.plan)
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


def _why_not_streamed(config: PipelineConfig) -> str | None:
    """Why this run cannot stream layers from disk, if it cannot (said before any weight is read)."""
    from pruning.importance import CRITERIA

    importance = config.pruning.importance
    if CRITERIA[importance].needs_backward:
        return f"pruning.importance: {importance} needs a backward through the whole model in memory"
    if CRITERIA[config.pruning.importance].needs_data and config.calibration.engine == "whole_model":
        return "calibration.engine: whole_model needs every weight in memory (layerwise streams)"
    return None


def _criterion_options(config: PipelineConfig, store: object) -> dict[str, object]:
    """The options of the configured criterion that the config sets (each criterion takes its own)."""
    from pruning.importance import CRITERIA

    cls, cal = CRITERIA[config.pruning.importance], config.calibration
    wanted = {
        "batch_size": cal.batch_size,
        "engine": cal.engine,
        "store": store,
        "gradient_checkpointing": cal.gradient_checkpointing,
        "ridge": config.compensation.ridge,
    }
    return {key: value for key, value in wanted.items() if key in getattr(cls, "__dataclass_fields__", {})}


def _count(model: object) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters)."""
    from pruning.families import adapter_for

    return sum(p.numel() for p in model.parameters()), sum(
        p.numel() for p in adapter_for(model.config).decoder_layers(model).parameters()
    )
