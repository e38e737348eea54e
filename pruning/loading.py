"""Load the model to prune: built-in name, local directory or hub id, checked before weights are read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pruning.config import ModelConfig
from pruning.errors import UserError
from pruning.models import BUILTIN_MODELS, looks_like_hub_id, resolve

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


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device: {name!r} requested but no CUDA device is available")
    return name


def load_model_and_tokenizer(cfg: ModelConfig, path: str) -> tuple[Any, Any]:
    """``from_pretrained`` in the configured dtype on the configured device, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pruning.architectures import check_supported

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot read the config of {path!r}: {str(e).splitlines()[0]}") from e
    check_supported(config)
    if getattr(config, "pruning_layout", None):
        raise UserError(f"model.path: {path} is already pruned; prune the original model instead")
    device = pick_device(cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from e
    try:
        # safetensors only: never unpickle a pytorch_model.bin without the user's consent
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, cfg.dtype), use_safetensors=True
        )
    except OSError as e:
        raise UserError(
            f"model.path: no safetensors weights in {path!r} (pickled .bin weights are not loaded; "
            f"convert them to safetensors): {str(e).splitlines()[0]}"
        ) from e
    model.to(device).eval()
    return model, tokenizer
