"""Every check that needs no weights: it runs before any weight is read, and in ``--dry-run``.

A run that cannot succeed (a protected layer that does not exist, a minimum above what the model has,
a ratio the constraints cannot reach, windows longer than the model's context, a missing calibration
file, a GPU that is not there, an output directory it may not write over, not enough disk) fails in a
second with one line naming the key, not after minutes of loading and scoring. ``check_before_loading``
runs them all, in that order; the facts they share about the run (does it need calibration text, can
it stream) are answered here once, from the criterion's declared facts.
"""

from __future__ import annotations

import logging
import math
import resource
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruning.config import ModelConfig, PipelineConfig
from pruning.criteria.registry import CRITERIA
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.families.layout import LAYOUT_KEY
from pruning.families.shape_rules import check_config_values, compare_to_config, first_of
from pruning.rundir.lock import check_lock_path
from pruning.rundir.target import check_output_dir, check_writable, resolve_target
from pruning.source.builtin import looks_like_hub_id
from pruning.source.loading import hub_snapshot, resolve_model_path
from pruning.source.placement import check_devices
from pruning.storage.json_files import read_json_object
from pruning.storage.weight_files import NO_TORCH_DTYPE, PICKLE_SUFFIXES, find_weight_files, stored_tensors

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_CALIBRATION_TOKENS = 100_000_000  # 0.8 GB of token ids; far beyond any published calibration set
_REPORTS_SLACK = 16 * 2**20  # plan, run record, analysis reports, and the filesystem's rounding


@dataclass(frozen=True)
class ModelFacts:
    """What the config says about the dense model to prune (every layer has the same shape)."""

    config: dict[str, Any]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int | None
    total_params: int
    layer_params: int
    kv_group_cost: int  # parameters one KV group owns (its query, key and value rows, output columns)
    channel_cost: int  # parameters one MLP channel owns


def read_model_config(model_path: str) -> dict[str, Any]:
    """config.json as plain JSON (a hub id's config is fetched, small, before any weights)."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        return read_json_object(config_file)
    if looks_like_hub_id(model_path):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model_path).to_dict()
        except (OSError, ValueError) as e:
            raise UserError(
                f"model.path: cannot read the config of {model_path!r}: {str(e).splitlines()[0]}"
            ) from e
    raise UserError(f"model.path: {model_path} has no config.json")


def model_facts(config: dict[str, Any], where: str = "model.path") -> ModelFacts:
    """Facts for the checks; a config that cannot describe a prunable model is the user's error."""
    adapter = adapter_for(config)
    if config.get(LAYOUT_KEY):
        raise UserError(f"{where}: the model is already pruned; prune the original model instead")
    try:
        check_config_values(config)
    except ValueError as e:
        raise UserError(f"{where}: config.json {e}") from e
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and (not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos <= 0):
        raise UserError(
            f"{where}: config.json key 'max_position_embeddings' must be a positive integer, got {max_pos!r}"
        )
    _parse_with_transformers(config, where)
    dense = adapter.dense_sizes(config)  # positive integers: check_config_values saw to it
    heads, kv = dense.num_heads, dense.num_kv_heads
    if heads % kv:
        raise UserError(
            f"{where}: config.json has {heads} attention heads for {kv!r} KV heads; the heads must divide "
            "into KV groups of equal size (num_attention_heads a multiple of num_key_value_heads)"
        )
    shapes = adapter.parameter_shapes(config)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    layer0 = "model.layers.0."
    costs = adapter.layer_costs(
        {name[len(layer0) :]: shape for name, shape in shapes.items() if name.startswith(layer0)},
        adapter.head_dim(config),
    )
    return ModelFacts(
        config=config,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=dense.intermediate_size,
        max_position_embeddings=max_pos,
        total_params=sum(sizes.values()),
        layer_params=sum(n for name, n in sizes.items() if name.startswith("model.layers.")),
        kv_group_cost=costs.kv_group_cost,
        channel_cost=costs.channel_cost,
    )


def _parse_with_transformers(config: dict[str, Any], where: str) -> None:
    """The config class transformers will build the model from accepts every value (types, ranges)."""
    from transformers import CONFIG_MAPPING

    try:
        CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    except Exception as e:  # transformers validates with several exception types; all mean a bad value
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{where}: config.json is not a valid {config['model_type']} config: {first_line}"
        ) from e


def check_run(config: PipelineConfig, facts: ModelFacts) -> None:
    """Every config value checked against the model it will meet."""
    needs_data = needs_calibration_text(config)
    prn, cal = config.pruning, config.calibration
    bad = sorted(i for i in prn.protected_layers if i >= facts.num_layers)
    if bad:
        raise UserError(
            f"pruning.protected_layers: {bad} out of range: the model has layers 0..{facts.num_layers - 1}"
        )
    if prn.min_kv_groups > facts.num_kv_heads:
        raise UserError(
            f"pruning.min_kv_groups: {prn.min_kv_groups} is more than the {facts.num_kv_heads} KV groups "
            "each layer has"
        )
    if prn.min_channels > facts.intermediate_size:
        raise UserError(
            f"pruning.min_channels: {prn.min_channels} is more than the {facts.intermediate_size} MLP "
            "channels each layer has"
        )
    if needs_data and cal.num_samples * cal.seq_len > MAX_CALIBRATION_TOKENS:
        raise UserError(
            f"calibration.num_samples: {cal.num_samples:,} windows x {cal.seq_len:,} tokens = "
            f"{cal.num_samples * cal.seq_len:,} tokens, more than the {MAX_CALIBRATION_TOKENS:,} a run "
            "calibrates on"
        )
    if needs_data and facts.max_position_embeddings and cal.seq_len > facts.max_position_embeddings:
        raise UserError(
            f"calibration.seq_len: {cal.seq_len} is longer than the model's max_position_embeddings "
            f"({facts.max_position_embeddings})"
        )
    if prn.multiple_of > facts.intermediate_size:
        logger.warning(
            "pruning.multiple_of: %d is more than the %d MLP channels each layer has, so a layer can keep "
            "none or all of them: every pruned MLP is removed whole, and the run may remove far more than "
            "its target",
            prn.multiple_of,
            facts.intermediate_size,
        )
    if prn.heads_multiple_of > facts.num_heads:
        logger.warning(
            "pruning.heads_multiple_of: %d is more than the %d query heads each layer has, so every pruned "
            "attention block is removed whole",
            prn.heads_multiple_of,
            facts.num_heads,
        )
    base = facts.total_params if prn.ratio_of == "total" else facts.layer_params
    unprotected = facts.num_layers - len(set(prn.protected_layers))
    reachable = unprotected * (
        (facts.num_kv_heads - prn.min_kv_groups) * facts.kv_group_cost
        + (facts.intermediate_size - prn.min_channels) * facts.channel_cost
    )
    if reachable < prn.ratio * base:
        raise UserError(
            f"pruning.ratio: cannot remove {prn.ratio:.2%} of {prn.ratio_of} parameters: with "
            f"protected_layers={sorted(prn.protected_layers)}, min_kv_groups={prn.min_kv_groups}, "
            f"min_channels={prn.min_channels} at most {reachable / base:.2%} can go"
        )


def estimate_output_bytes(config: PipelineConfig, facts: ModelFacts, model_path: str) -> tuple[int, int]:
    """(bytes the whole run writes, bytes of its largest file), from the parameters that will remain."""
    prn = config.pruning
    base = facts.total_params if prn.ratio_of == "total" else facts.layer_params
    weights = int((facts.total_params - prn.ratio * base) * DTYPE_BYTES[config.model.dtype])
    source = Path(model_path)
    side_files = 0  # tokenizer and configs are copied beside the weights
    if source.is_dir():
        side_files = sum(
            p.stat().st_size
            for p in source.iterdir()
            if p.is_file() and p.suffix not in (".safetensors", *PICKLE_SUFFIXES, ".gguf")
        )
    bytes_per_param = DTYPE_BYTES[config.model.dtype]
    biggest_tensor = int(facts.config["vocab_size"]) * int(facts.config["hidden_size"]) * bytes_per_param
    largest_file = min(weights, max(config.output.max_shard_bytes, biggest_tensor))  # a tensor is never split
    return weights + side_files + _REPORTS_SLACK, largest_file


def check_file_size_limit(output_dir: Path, largest_file: int) -> None:
    """``ulimit -f`` below the checkpoint's largest file would fail the save at the end; fail now."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < largest_file:
        raise UserError(
            f"output.dir {output_dir}: the file size limit (ulimit -f) is {soft:,} bytes, but the checkpoint "
            f"needs a file of about {largest_file:,} bytes"
        )


def check_before_loading(config: PipelineConfig, *, dry_run: bool = False) -> tuple[str, Path]:
    """Every check, in order; returns the model's local path (or hub id) and the output directory.

    Nothing is written (a built-in model is downloaded to its cache on first use). A dry run accepts a
    model directory that holds only config.json (to plan a run on a machine without the weights).
    """
    model_path = resolve_model_path(config.model)
    facts = model_facts(read_model_config(model_path))
    check_run(config, facts)
    check_source_weights(model_path, facts.config, config.model.trust_pickle, require=not dry_run)
    check_calibration_source(config)
    check_devices(config.model)  # a missing GPU fails now, not after the weights are read
    target = resolve_target(config.output.dir)
    check_lock_path(target)
    check_output_dir(target, config.output.overwrite, model_path)
    needed, largest_file = estimate_output_bytes(config, facts, model_path)
    check_writable(target, needed)
    check_file_size_limit(target, largest_file)
    return model_path, target


def needs_calibration_text(config: PipelineConfig) -> bool:
    """Whether the run reads calibration windows: for its criterion, or for the refit."""
    return CRITERIA.get(config.pruning.importance).needs_data or config.compensation.method == "refit"


def why_not_streamed(config: PipelineConfig) -> str | None:
    """Why this run cannot stream layers from disk, if it cannot (said before any weight is read)."""
    importance = config.pruning.importance
    criterion = CRITERIA.get(importance)
    if criterion.needs_whole_model:
        what = "a backward through" if criterion.needs_backward else "every weight of"
        return f"pruning.importance: {importance} needs {what} the whole model in memory"
    if criterion.needs_data and config.calibration.engine == "whole_model":
        return "calibration.engine: whole_model needs every weight in memory (layerwise streams)"
    return None


def check_calibration_source(config: PipelineConfig) -> None:
    """Calibration text that cannot give its windows fails before any weights load: a missing, empty,
    binary or too short file, or a source whose weight rounds to no window."""
    from pruning.calibration.data import (
        is_text_file_path,
        looks_like_path,
        source_text,
        text_problem,
        window_counts,
    )
    from pruning.calibration.texts import NAMES, PREFIX, is_builtin

    if not needs_calibration_text(config):
        return
    cal = config.calibration
    key = "calibration.sources" if cal.sources else "calibration.source"
    mix = cal.mix()
    counts = window_counts([item.weight for item in mix], cal.num_samples)
    for item, count in zip(mix, counts, strict=True):
        source = item.source
        if is_builtin(source) and source.removeprefix(PREFIX) not in NAMES:
            known = ", ".join(PREFIX + name for name in NAMES)
            raise UserError(f"{key}: unknown built-in text {source!r}: known are {known}")
        local = is_builtin(source) or is_text_file_path(source)
        if not local and looks_like_path(source):
            raise UserError(f"{key}: file not found: {source}")
        if count == 0:
            raise UserError(
                f"{key}: {source} (weight {item.weight:g}) gets no window of the {cal.num_samples} "
                "(raise num_samples or its weight)"
            )
        if not local:
            continue  # a datasets name: read when the run reaches calibration
        try:
            problem = text_problem(source_text(source), cal.seq_len + 1)
        except UserError as e:
            raise UserError(f"{key}: {e}") from e
        if problem is not None:
            raise UserError(f"{key}: {source} {problem}")


def check_source_weights(
    model_path: str, config: dict[str, Any], trust_pickle: bool, *, require: bool = True
) -> None:
    """The source's weight files, read from their headers only, are complete and have the config's shapes.

    transformers would re-initialise a missing or mis-shaped tensor at random (with a warning in a long
    log) and ``torch.load`` any ``.bin`` an index names, so both are checked here, before loading.
    ``require=False`` (``--dry-run`` on a directory holding only config.json) accepts no weights at all.
    """
    directory = Path(model_path)
    if not directory.is_dir():
        return  # a hub id: the download is restricted to safetensors (see load_model_and_tokenizer)
    try:
        files = find_weight_files(directory, trust_pickle=trust_pickle)
    except UserError as e:
        raise UserError(f"model.path: {e}") from e
    _check_no_special_files(directory)  # after: a weight file's own name gets the more precise word
    if not files.safetensors and not files.pickles:
        if not require:
            return
        raise UserError(f"model.path: {directory} holds no weights (no model.safetensors, index or shards)")
    if files.pickles:
        return  # trusted pickles: shapes are checked by transformers when it loads them
    try:
        stored = stored_tensors(files)
    except UserError as e:
        raise UserError(f"model.path: {e}") from e
    unreadable = next((name for name, info in stored.items() if info.dtype in NO_TORCH_DTYPE), None)
    if unreadable is not None:
        raise UserError(
            f"model.path: {directory}: {unreadable} is stored as {stored[unreadable].dtype}, which torch "
            "cannot hold; convert the weights to a wider dtype"
        )
    diff = compare_to_config(config, {name: info.shape for name, info in stored.items()})
    if diff.missing:
        raise UserError(
            f"model.path: {directory}: the weights lack {first_of(diff.missing)}, which config.json needs"
        )
    if diff.mismatched:
        name, shape, needed = diff.mismatched[0]
        raise UserError(
            f"model.path: {directory}: {name} is stored as {list(shape)}, config.json needs {list(needed)}"
        )
    if diff.unexpected:  # transformers would drop them: a config with fewer layers than the weights, say
        raise UserError(
            f"model.path: {directory}: the weights hold {first_of(diff.unexpected)}, which config.json lacks"
        )


def _check_no_special_files(directory: Path) -> None:
    """transformers opens the tokenizer's and the generation config's files itself, by name: a FIFO
    there would block it for ever and a device would never end, so none may be in the model directory."""
    for entry in sorted(directory.iterdir()):
        try:
            mode = entry.stat().st_mode  # through links, as transformers opens them
        except OSError:
            continue  # a dangling link: whoever opens it says so in one line
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UserError(
                f"model.path: {entry} is a FIFO, device or socket; a model directory holds files, and "
                "transformers would block or never finish reading it"
            )


def local_source(model: ModelConfig, model_path: str) -> str:
    """The model's local directory: a hub id is downloaded (safetensors only, unless pickles are
    trusted) and its weights checked like a local model's before anything reads them."""
    if Path(model_path).exists() or not looks_like_hub_id(model_path):
        return model_path
    local = hub_snapshot(model_path, model.trust_pickle)
    check_source_weights(local, read_model_config(local), model.trust_pickle)
    return local
