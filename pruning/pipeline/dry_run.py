"""``--dry-run``: show what would run, after every check ``prepare`` makes (config.json and headers only)."""

from __future__ import annotations

from pathlib import Path

from pruning.analysis import ModelAnalyzer
from pruning.config import PipelineConfig
from pruning.errors import UserError
from pruning.hooks.context import PipelineContext
from pruning.pipeline.preflight import DTYPE_BYTES, needs_calibration_text
from pruning.pipeline.run import STAGES, where_it_runs
from pruning.rundir.target import CHECKPOINT_SUBDIR


def describe_run(context: PipelineContext, hook_names: list[str]) -> str:
    """A plan of the run in words: model size, stages, calibration size, parameters to remove."""
    config = context.config
    config_file = Path(context.model_path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"model.path: --dry-run needs a local config.json; {config_file} does not exist")
    analysis = ModelAnalyzer(config_file, Path(context.model_path).name).analyze()
    cal, prn = config.calibration, config.pruning
    total = analysis["total_params"]
    layers = analysis["layer_summary"]["total_layer_params"]
    base = total if prn.ratio_of == "total" else layers
    remove = round(prn.ratio * base)
    first = analysis["layers"][0]["attention"]
    num_layers, tokens = analysis["layer_summary"]["num_layers"], cal.num_samples * cal.seq_len
    lines = [
        f"Dry run of {config.name!r} ({config.source_file}); nothing is loaded or written.",
        f"  model:       {context.model_path} ({analysis['model_type']}, {num_layers} layers, "
        f"{first['num_heads']}Q:{first['num_kv_heads']}KV heads, {total:,} parameters, "
        f"{config.model.dtype} on {where_it_runs(config)})",
        f"  memory:      {_memory_line(config, total)}",
        f"  stages:      {' -> '.join(STAGES)}; events before_prune, after_prune, after_save",
        f"  calibration: {cal.num_samples} windows x {cal.seq_len} tokens = {tokens:,} tokens "
        f"from {cal.describe()} (seed {cal.seed}, batch {cal.batch_size})"
        if needs_calibration_text(config)
        else f"  calibration: none ({prn.importance} needs no data)",
        f"  importance:  {prn.importance}; ranked globally across all layers",
        f"  compensation: {config.compensation.method}"
        + (
            f" (output projections refit layer by layer, ridge {config.compensation.ridge:g}, "
            f"selection {config.compensation.selection})"
            if config.compensation.method == "refit"
            else ""
        ),
        f"  target:      remove {prn.ratio:.2%} of {prn.ratio_of} parameters = {remove:,} "
        f"(decoder layers hold {layers:,}); about {total - remove:,} parameters remain",
        f"  protected:   layers {list(prn.protected_layers) or 'none'}; min KV groups {prn.min_kv_groups}, "
        f"min channels {prn.min_channels} per layer",
        f"  shape:       {'one size for every layer (stock config)' if prn.uniform else 'sizes per layer'}"
        f"; kept channels a multiple of {prn.multiple_of}, kept query heads of {prn.heads_multiple_of}",
        f"  output:      {context.output_dir} (checkpoint in {CHECKPOINT_SUBDIR}/, run.json, plan.json)",
        f"  hooks:       {', '.join(hook_names) or 'none'}",
    ]
    return "\n".join(lines)


def _memory_line(config: PipelineConfig, total_params: int) -> str:
    """What holding the weights costs, and whether this machine would stream them (single-device maps;
    an auto or explicit map is resolved by accelerate at load)."""
    from pruning.source.placement import stream_decision

    size = total_params * DTYPE_BYTES[config.model.dtype]
    return f"{size / 2**30:.2f} GiB of weights in {config.model.dtype}; {stream_decision(config.model, size)}"
