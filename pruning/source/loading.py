"""Load the model to prune: a built-in name or hub id resolved to a local directory, then the model
placed as the config says. The checks that need no weights are ``pruning.pipeline.preflight``'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruning.config import ModelConfig
from pruning.errors import UserError
from pruning.source.builtin import BUILTIN_MODELS, looks_like_hub_id, resolve
from pruning.storage.json_files import read_json_object
from pruning.storage.weight_files import find_weight_files

logger = logging.getLogger(__name__)


def resolve_model_path(cfg: ModelConfig) -> str:
    """The local directory (or hub id) for ``model.path``; a built-in name is downloaded once."""
    path = resolve(cfg.path)
    if Path(path).exists():
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"model.path: {path} has no config.json")
        return path
    if looks_like_hub_id(path):
        return path  # a hub id; from_pretrained says if it cannot be reached
    raise UserError(
        f"model.path: {cfg.path!r} is not a local directory, a hub id or a built-in model "
        f"({', '.join(BUILTIN_MODELS)})"
    )


# What a hub download may bring: configs, tokenizer files and safetensors, never a pickle.
HUB_SAFE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*")


def hub_snapshot(hub_id: str, trust_pickle: bool) -> str:
    """Download a hub model to the local cache and return its directory, so it is checked like a local one.

    Without ``trust_pickle`` only configs, tokenizer files and safetensors are fetched: an index that
    names ``.bin`` files then fails the local check instead of being unpickled by transformers.
    """
    from huggingface_hub import snapshot_download

    patterns = None if trust_pickle else list(HUB_SAFE_PATTERNS)
    try:
        return snapshot_download(hub_id, allow_patterns=patterns)
    except Exception as e:  # the hub client raises many types; all mean "cannot get this model"
        raise UserError(f"model.path: cannot download {hub_id!r}: {str(e).splitlines()[0]}") from e


@dataclass
class LoadedModel:
    """A model placed for a run, with its tokenizer and where its layers' weights come from."""

    model: Any
    tokenizer: Any
    store: Any  # pruning.calibration.engine.LayerStore
    placement: Any  # pruning.source.placement.Placement


def load_model_and_tokenizer(cfg: ModelConfig, path: str, refuse_streaming: str | None = None) -> LoadedModel:
    """The model in the local directory ``path``, in the configured dtype, placed as ``model.device_map``
    says (``pruning.source.placement``), in eval mode; its tokenizer; and the engine's ``LayerStore``.

    Safetensors are read part by part onto a meta skeleton (``pruning.storage.shards.ShardReader``),
    parts on ``disk`` left for the passes to stream: read, not memory-mapped as ``from_pretrained`` would,
    so the model holds no page of a file that can change (a source truncated mid-run would kill a
    mapped run with SIGBUS, no message; read, it is one line). Only trusted pickles take
    ``from_pretrained``.
    ``refuse_streaming`` (why this run cannot stream) turns a streamed placement into a UserError
    before any weight is read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pruning.calibration.engine import ResidentLayers
    from pruning.families import check_supported
    from pruning.families.layout import LAYOUT_KEY
    from pruning.source.placement import resolve_placement
    from pruning.source.streaming import build_skeleton

    # Before transformers reads it: a pruned checkpoint's config names modeling code to run.
    if read_json_object(Path(path) / "config.json").get(LAYOUT_KEY):
        raise UserError(f"model.path: {path} is already pruned; prune the original model instead")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot read the config of {path!r}: {str(e).splitlines()[0]}") from e
    check_supported(config)
    dtype = getattr(torch, cfg.dtype)
    try:
        skeleton = build_skeleton(config, dtype)
    except (KeyError, ValueError, TypeError) as e:  # values in config.json it cannot build from
        raise _cannot_load(path, e) from e
    placement = resolve_placement(cfg, skeleton)
    logger.info("placement: %s", placement.reason)
    if placement.streamed and refuse_streaming:
        raise UserError(f"{refuse_streaming}; {placement.reason}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from e
    if find_weight_files(Path(path), trust_pickle=cfg.trust_pickle).safetensors:
        model, store = _load_placed(path, skeleton, placement, dtype, cfg.trust_pickle)
        return LoadedModel(model, tokenizer, store, placement)
    if placement.streamed or len(placement.devices) > 1:
        raise UserError(
            f"model.device_map: placing or streaming parts reads safetensors; {path} has pickled weights"
        )
    del skeleton  # trusted pickles on one device: transformers' loader reads them
    try:
        # safetensors only, unless the user trusts pickles: never unpickle a .bin without consent
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=None if cfg.trust_pickle else True,
            # straight to the GPU, never whole in host memory first
            device_map=placement.compute if placement.compute != "cpu" else None,
        )
    except OSError as e:
        raise UserError(
            f"model.path: no safetensors weights in {path!r} (pickled .bin weights are not loaded; "
            f"convert them to safetensors): {str(e).splitlines()[0]}"
        ) from e
    except (KeyError, ValueError, TypeError) as e:  # values in config.json (or an index) it cannot use
        raise _cannot_load(path, e) from e
    model.to(placement.compute).eval()
    return LoadedModel(model, tokenizer, ResidentLayers(), placement)


def _cannot_load(path: str, e: Exception) -> UserError:
    detail = str(e).splitlines()[0] if str(e) else ""
    return UserError(
        f"model.path: transformers cannot load the model in {path}: {type(e).__name__}: {detail}"
    )


def _load_placed(path: str, skeleton: Any, placement: Any, dtype: Any, trust_pickle: bool) -> tuple[Any, Any]:
    from transformers import GenerationConfig

    from pruning.source.streaming import load_placed
    from pruning.storage.shards import ShardReader

    files = find_weight_files(Path(path), trust_pickle=trust_pickle)
    if files.pickles or not files.safetensors:
        raise UserError(
            f"model.device_map: placing or streaming parts reads safetensors; {path} has pickled weights"
        )
    model, store = load_placed(skeleton, ShardReader(files), placement, dtype)
    if (Path(path) / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # from_pretrained falls back to the config's defaults too
            logger.warning("%s/generation_config.json cannot be read (%s); using defaults", path, e)
    model.config._name_or_path = str(path)
    return model, store
