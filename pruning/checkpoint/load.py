"""Load a pruned checkpoint (or any stock safetensors one): build the stock architecture on the
``meta`` device, shrink it to the checkpoint's ``pruning_layout`` with the same slicing surgery uses,
and assign the stored tensors, so the dense size is never allocated. Every tensor is checked against
the files' headers before anything is built: ``config.json`` first meets the limits the analysis
applies (``families.config_limits``), then every parameter it implies must be stored with the shape it
implies, so the model built is exactly as large as the files and a forged config cannot make the
loader allocate what no file holds. Pickles are never loaded unless the caller says it trusts the file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from pruning.checkpoint.config_json import loader_config
from pruning.checkpoint.load_checks import check_against_headers, check_config
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.families.layout import LAYOUT_KEY, Layout, stock_model_type
from pruning.storage.json_files import read_json_object
from pruning.storage.shards import SAFETENSORS_DTYPES
from pruning.storage.weight_files import PICKLE_SUFFIXES, TensorInfo, WeightFiles, find_weight_files
from pruning.surgery import resize_to_layout

logger = logging.getLogger(__name__)


def _as_config(config: Mapping[str, Any] | PretrainedConfig, where: str = "config.json") -> PretrainedConfig:
    """The family's stock config class: a pruned checkpoint's ``pruned_<type>`` (or the shipped code's
    config object) is read as ``<type>`` with its layout, which this package's surgery builds. A value
    transformers' config class refuses is one line naming ``where``."""
    if isinstance(config, PretrainedConfig):
        if stock_model_type(config.model_type) == config.model_type:
            return config
        config = config.to_dict()
    data = loader_config(config)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{where} has unknown model_type {config.get('model_type')!r}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:  # transformers validates with several exception types; all mean a bad value
        words = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise UserError(f"{where} is not a valid {model_type} config: {words[:300]}") from e


class _WeightsBornOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device makes a meta tensor. ``nn.Linear`` and ``nn.Embedding`` create
    their weights with it, and ``init_empty_weights`` moves a weight to meta only once it exists, so each
    dense weight was allocated for a moment: a size no file vouches for (the dense model a layout was
    cut from) could ask for terabytes. Buffers are computed with other functions and stay real."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _materialize(model: nn.Module, device: str | torch.device) -> None:
    """Give every meta parameter uninitialized storage on ``device`` (a skeleton to be filled)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                empty = torch.empty_like(param, device=device)
                module._parameters[name] = nn.Parameter(empty, requires_grad=param.requires_grad)
    model.to(device)
    model.tie_weights()


def build_pruned_skeleton(
    config: Mapping[str, Any] | PretrainedConfig,
    device: str | torch.device = "meta",
    *,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The stock causal-LM class reshaped to ``config``'s ``pruning_layout``, weights on ``meta``.

    Rotary ``inv_freq`` buffers are built for real (they are computed, not stored). Without a layout the
    stock model is returned. With another ``device`` the weights get uninitialized storage there.
    """
    config = _as_config(config)
    adapter_for(config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False), _WeightsBornOnMeta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    data = getattr(config, LAYOUT_KEY, None)
    if data:
        try:
            resize_to_layout(model, Layout.parse(data, int(config.num_hidden_layers)))
        except ValueError as e:
            raise UserError(f"config.json: {e}") from e
    model.tie_weights()  # from_config under init_empty_weights leaves tied embeddings untied
    if str(device) != "meta":
        _materialize(model, device)
    return model


def _load_pickle(path: Path, dtype: torch.dtype | None, device: str | torch.device, trust: bool) -> nn.Module:
    if not trust:
        raise UserError(
            f"{path} is a pickle file; unpickling runs arbitrary code from the file, so it is not loaded by "
            "default. Use a safetensors checkpoint directory, or pass trust_pickle=True if you trust the "
            "file's source."
        )
    logger.warning("unpickling %s (trust_pickle=True): this runs code stored in the file", path)
    model = torch.load(path, weights_only=False, map_location=device)
    if not isinstance(model, nn.Module):
        raise UserError(f"{path} holds a {type(model).__name__}, not a whole model")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _check_names(path: Path, model: nn.Module, stored_names: set[str]) -> None:
    """The files hold every parameter of the skeleton and nothing else; a tied weight may be stored or
    not (transformers stores it once; older checkpoints store both names), as in a plain load."""
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    expected = set(model.state_dict(keep_vars=True)) - tied
    missing = sorted(expected - stored_names)
    unexpected = sorted(stored_names - expected - tied)
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match the config's architecture; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}{' ...' if len(missing) > 5 or len(unexpected) > 5 else ''}"
        )


def _load_dispatched(
    path: Path,
    model: nn.Module,
    files: WeightFiles,
    stored: dict[str, TensorInfo],
    dtype: torch.dtype | None,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> nn.Module:
    """accelerate reads the shards module by module straight to their devices (or the offload folder)."""
    from accelerate import load_checkpoint_and_dispatch

    if files.pickles:
        raise UserError(f"{path}: device_map needs safetensors weights; this checkpoint has pickled shards")
    _check_names(path, model, set(stored))
    layer_classes = sorted(
        {type(layer).__name__ for layer in adapter_for(model.config).decoder_layers(model)}
    )
    if dtype is None:  # keep the stored dtype, as a plain load does (accelerate would use the config's)
        dtype = _stored_dtype(stored)
    if device_map == "cpu":
        device_map = {"": "cpu"}
    elif isinstance(device_map, str):
        device_map = _infer_device_map(model, device_map, max_memory, layer_classes, dtype)
        if set(device_map.values()) == {"disk"}:
            raise UserError(
                f"{path}: max_memory {max_memory} leaves no room for any layer; all would go to disk"
            )
    if isinstance(device_map, dict) and set(device_map.values()) == {"disk"}:
        raise UserError(f"{path}: device_map puts every module on disk; nothing would compute")
    try:
        model = load_checkpoint_and_dispatch(
            model,
            str(path),
            device_map=device_map,
            max_memory=max_memory,
            no_split_module_classes=layer_classes,
            offload_folder=None if offload_folder is None else str(offload_folder),
            dtype=dtype,
        )
    except ValueError as e:  # accelerate's word for a map it cannot honour (disk without a folder, ...)
        raise UserError(f"{path}: device_map {device_map!r}: {str(e).splitlines()[0]}") from e
    _read_generation_config(model, path)
    logger.info("loaded %s onto %s", path, getattr(model, "hf_device_map", device_map))
    return model.eval()


def _read_generation_config(model: nn.Module, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def _stored_dtype(stored: dict[str, TensorInfo]) -> torch.dtype | None:
    """The floating dtype most stored tensors have (None when there is none)."""
    by_name = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}
    counts = Counter(info.dtype for info in stored.values() if info.dtype in by_name)
    return by_name[counts.most_common(1)[0][0]] if counts else None


def _infer_device_map(
    model: nn.Module,
    how: str,
    max_memory: dict[Any, Any] | None,
    layer_classes: list[str],
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """accelerate's ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``, resolved as
    ``load_checkpoint_and_dispatch`` resolves them, but here, so that the map can be checked."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if how not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise UserError(
            f"device_map {how!r}: expected auto, balanced, balanced_low_0, sequential, cpu or a dict"
        )
    if how != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=layer_classes,
            dtype=dtype,
            low_zero=how == "balanced_low_0",
        )
    return infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=layer_classes, dtype=dtype
    )


def _read_state(
    files: WeightFiles, dtype: torch.dtype | None, device: str | torch.device
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    parts = [load_file(file, device=str(device)) for file in files.safetensors]
    # Pickled shards reach here only when the caller trusted them; torch's weights-only unpickler still.
    parts += [torch.load(file, map_location=device, weights_only=True) for file in files.pickles]
    for part in parts:
        for key, tensor in part.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state


def load_pruned_model(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    trust_pickle: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Load a checkpoint written by ``save_pruned_model`` (or any stock safetensors one), in eval mode.

    Strict: every parameter must come from the files (tied ones excepted), with the shape the layout
    gives it, and no stored tensor may go unused; every shard the index names must be there and whole.
    ``config.json`` meets the analysis's limits and its shapes are compared with the headers before
    anything is built, so a bad value is a ``UserError`` naming the file and key, never an allocation.
    ``dtype`` None keeps the stored dtype. Pickles (a whole-model file, ``.bin`` shards, an index that
    points at them) are refused unless ``trust_pickle=True``.

    ``device_map`` (accelerate's: ``"auto"``, ``"balanced"``, ``"cpu"``, or a map of module names to
    devices, ``"cpu"`` or ``"disk"``) places each module as it is read, shard by shard, so the whole
    model never sits on one device; ``max_memory`` and ``offload_folder`` are passed on. A decoder layer
    is never split across devices.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            return _load_pickle(path, dtype, device, trust_pickle)
        raise UserError(f"{path} is a file: pass the checkpoint directory (with config.json)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} has no config.json")
    config = read_json_object(config_path)
    check_config(config_path, config)  # the analysis's limits, and what the skeleton costs to build
    stock = _as_config(config, str(config_path))
    files = find_weight_files(path, trust_pickle=trust_pickle)
    if not files.safetensors and not files.pickles:
        raise UserError(f"{path} holds no weights (no model.safetensors, index or shards)")
    stored = check_against_headers(path, config, files)  # what the config implies is what is stored
    model = build_pruned_skeleton(stock, attn_implementation=attn_implementation)
    if device_map is not None:
        return _load_dispatched(path, model, files, stored, dtype, device_map, max_memory, offload_folder)
    state = _read_state(files, dtype, device)

    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise UserError(
            f"{path}: weights do not match the config's architecture; missing {missing[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
            f"{' ...' if len(missing) > 5 or len(result.unexpected_keys) > 5 else ''}"
        )
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UserError(f"{path}: no stored weights for {still_meta[:5]}")
    model.to(device)  # buffers (rotary inv_freq) were built on the CPU
    _read_generation_config(model, path)
    logger.info("loaded %s (%s parameters)", path, f"{sum(p.numel() for p in model.parameters()):,}")
    return model.eval()
