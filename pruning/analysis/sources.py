"""Turn whatever the user points at into an Inventory, reading as little as possible.

- a live ``PreTrainedModel``: its parameters' shapes;
- a directory with ``*.safetensors`` (or its shard index): shapes from the file headers, each checked
  against its file, every shard the index names required (no tensor data is read);
- a directory or hub id with only ``config.json``: the model is built on the meta device;
- a ``.gguf`` file: tensor shapes and hyper-parameters from its metadata;
- a pickled ``.bin``/``.pt``: refused unless the caller opts in, because unpickling runs code.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pruning.analysis.gguf_source import read_gguf_model
from pruning.analysis.inventory import Inventory, arch_prefix_for, dtype_name, split_layer_name
from pruning.errors import UserError
from pruning.families import FAMILIES, GENERIC_FAMILY, FamilyAdapter, config_limits, shape_rules
from pruning.families.layout import LAYOUT_KEY, Layout, stock_model_type
from pruning.source.builtin import BUILTIN_MODELS, looks_like_hub_id, resolve
from pruning.storage.json_files import read_json_object
from pruning.storage.weight_files import (
    PICKLE_SUFFIXES,
    SAFE_INDEX,
    WeightFiles,
    find_weight_files,
    stored_tensors,
)


def load_inventory(model_or_path: Any, trust_pickle: bool = False) -> Inventory:
    """Dispatch on the kind of input; every failure a user can cause is a UserError naming the path."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return inventory_from_module(model_or_path)
    if str(model_or_path).lower() in BUILTIN_MODELS and not Path(model_or_path).exists():
        model_or_path = resolve(str(model_or_path))
    path = Path(model_or_path)
    if path.is_file():
        if path.suffix == ".gguf":
            return inventory_from_gguf(path)
        if path.suffix == ".safetensors":
            return inventory_from_safetensors(path.parent, WeightFiles(path.parent, safetensors=(path,)))
        if path.suffix in PICKLE_SUFFIXES:
            return inventory_from_pickle(path, trust_pickle)
        if path.name == "config.json":
            return inventory_from_config(path.parent)
        raise UserError(f"{path}: unsupported file type (expected a model directory, .safetensors or .gguf)")
    if path.is_dir():
        if (path / SAFE_INDEX).is_file() or any(path.glob("*.safetensors")):
            return inventory_from_safetensors(path, find_weight_files(path, trust_pickle=trust_pickle))
        if (path / "config.json").is_file():
            return inventory_from_config(path)
        raise UserError(f"{path}: directory has neither config.json nor *.safetensors")
    if path.suffix == ".gguf" and path.exists():  # not a regular file: the reader says what it is
        return inventory_from_gguf(path)
    if path.exists():  # a FIFO, device or socket: refused, never opened (a FIFO would block)
        raise UserError(f"{path}: not a regular file or directory (a FIFO, device or socket)")
    if looks_like_hub_id(str(model_or_path)):
        return inventory_from_config(str(model_or_path))
    raise UserError(f"{path}: no such file or directory")


# -- live modules ------------------------------------------------------------------------------------


def inventory_from_module(model: Any, source: str = "live", dtype: str | None = None) -> Inventory:
    """Shapes of a live (or meta) model; tied weights appear once in ``named_parameters``."""
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UserError(f"expected a transformers PreTrainedModel or a path, got {type(model).__name__}")
    params = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    family = FAMILIES.get(getattr(model.config, "model_type", None)) or GENERIC_FAMILY
    kind_at = {path: kind for kind, path in family.blocks.items()}
    block_types = {}
    for name, module in model.named_modules():
        split = split_layer_name(name)
        if split is not None and split[1] in kind_at:
            block_types[(split[0], kind_at[split[1]])] = type(module).__name__
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    if dtype is None:
        floating = [p.dtype for p in params.values() if p.is_floating_point()]
        dtype = dtype_name(Counter(floating).most_common(1)[0][0]) if floating else "unknown"
    return _inventory(model.config, shapes, dtype, tied, source, block_types)


# -- config.json only --------------------------------------------------------------------------------


def inventory_from_config(path: str | Path) -> Inventory:
    """Shapes from ``config.json`` alone: by rule for the supported families, else built on meta."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        data = read_json_object(config_file)
        family = FAMILIES.get(data.get("model_type"))
        if family is not None:
            _check_values(data, config_file)
            shapes = family.parameter_shapes(data)
            dtype = dtype_name(data.get("dtype") or data.get("torch_dtype") or "unknown")
            tied = family.tied_embeddings(data)
            return _inventory(SimpleNamespace(**data), shapes, dtype, tied, "config", {}, family=family)
    return _inventory_from_meta_build(path)


def _inventory_from_meta_build(path: str | Path) -> Inventory:
    """Any other architecture transformers knows: build it on the meta device (exact, no allocation)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _auto_config(path)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise UserError(f"{path}: unsupported architecture: {_first_line(e)}") from e
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "unknown"
    return inventory_from_module(model, source="config", dtype=dtype_name(dtype))


def _auto_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if config_file.is_file():
        model_type = read_json_object(config_file).get("model_type")
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise UserError(f"{config_file}: unsupported architecture {model_type!r} (not in transformers)")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as e:
        raise UserError(f"{config_file}: unsupported architecture: {_first_line(e)}") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read a model config ({_first_line(e)})") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- safetensors headers -----------------------------------------------------------------------------


def inventory_from_safetensors(directory: Path, files: WeightFiles) -> Inventory:
    """Shapes from headers only (each checked against its file); config facts from plain ``config.json``.

    Shards the index maps to pickles are read only because the caller trusted them (``find_weight_files``
    refuses them otherwise), and then with torch's weights-only unpickler.
    """
    config = _plain_config(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: Counter[str] = Counter()
    for name, info in stored_tensors(files).items():
        shapes[name] = info.shape
        dtypes[info.dtype] += 1
    for file in files.pickles:
        for name, tensor in _pickled_state_dict(file).items():
            shapes[name] = tuple(tensor.shape)
            dtypes[dtype_name(tensor.dtype)] += 1
    _check_complete(config, shapes, directory)
    family = FAMILIES.get(config.model_type) or GENERIC_FAMILY
    has_embedding = any(family.top_level_part(name) == "embedding" for name in shapes)
    tied = family.lm_head not in shapes and has_embedding  # tied weights are stored once
    dtype = dtype_name(dtypes.most_common(1)[0][0]) if dtypes else "unknown"
    return _inventory(config, shapes, dtype, tied, "safetensors", {})


def _pickled_state_dict(file: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a state dict
        raise UserError(f"{file}: not a readable state dict ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise UserError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _plain_config(directory: Path) -> SimpleNamespace:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file}: missing (needed beside the safetensors files)")
    data = read_json_object(config_file)
    if "model_type" not in data:
        raise UserError(f"{config_file}: missing key 'model_type'")
    if FAMILIES.get(data.get("model_type")) is not None:
        _check_values(data, config_file)
    else:  # another family: only what the counting reads
        for key in ("hidden_size", "num_attention_heads", "head_dim"):
            value = data.get(key)
            if (value is not None or key != "head_dim") and (not isinstance(value, int) or value <= 0):
                raise UserError(f"{config_file}: key {key!r} must be a positive integer, got {value!r}")
    return SimpleNamespace(**data)


def _check_values(data: dict[str, Any], config_file: Path) -> None:
    try:
        config_limits.check_model_config(data)  # the limits load_pruned_model applies too
    except ValueError as e:
        raise UserError(f"{config_file}: {e}") from e


def _check_complete(config: SimpleNamespace, shapes: dict[str, tuple[int, ...]], directory: Path) -> None:
    """For a family whose shapes follow from config.json: no tensor the config implies is absent, and
    with a ``pruning_layout`` each has the layout's shape. (Without a layout, shapes may differ: other
    tools prune without recording how, and the weights are the truth the report counts.)"""
    data = vars(config)
    if FAMILIES.get(data.get("model_type")) is None:
        return
    diff = shape_rules.compare_to_config(data, shapes)
    if diff.missing:
        raise UserError(
            f"{directory}: the weights lack {shape_rules.first_of(diff.missing)}, which config.json says "
            "the model has; the checkpoint is incomplete"
        )
    if data.get(LAYOUT_KEY) and diff.mismatched:
        name, shape, needed = diff.mismatched[0]
        raise UserError(
            f"{directory}: {name} is stored as {list(shape)}, but the {LAYOUT_KEY} in "
            f"config.json needs {list(needed)}"
        )


# -- GGUF --------------------------------------------------------------------------------------------


def inventory_from_gguf(file: Path) -> Inventory:
    """Shapes and hyper-parameters from the header alone (``gguf_source``: every length bounded)."""
    model = read_gguf_model(file)
    return _inventory(model.config, model.shapes, model.dtype, model.tied, "gguf", {}, family=model.family)


# -- pickles -----------------------------------------------------------------------------------------


def inventory_from_pickle(file: Path, trust_pickle: bool) -> Inventory:
    """Only with explicit consent: ``torch.load(weights_only=False)`` can execute code in the file."""
    if not trust_pickle:
        raise UserError(
            f"{file}: refusing to unpickle (loading a pickle can run arbitrary code); if you trust this "
            "file, pass --trust-pickle (or trust_pickle=True), or analyse the model directory instead"
        )
    import torch

    obj = torch.load(file, map_location="meta", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return inventory_from_module(obj, source="pickle")
    raise UserError(
        f"{file}: holds a {type(obj).__name__}, not a whole model; analyse the directory with its config.json"
    )


# -- common ------------------------------------------------------------------------------------------


def _inventory(
    config: Any,
    shapes: dict[str, tuple[int, ...]],
    dtype: str,
    tied: bool,
    source: str,
    block_types: dict,
    family: FamilyAdapter | None = None,
) -> Inventory:
    family = family or FAMILIES.get(getattr(config, "model_type", None))
    head_dim = (family or GENERIC_FAMILY).head_dim(config)
    layer_ids = {split[0] for name in shapes if (split := split_layer_name(name))}
    num_layers = getattr(config, "num_hidden_layers", None) or (max(layer_ids) + 1 if layer_ids else 0)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        try:
            num_layers = len(Layout.parse(layout, int(num_layers)))
        except ValueError as e:
            raise UserError(f"config.json: {e}") from e
    if num_layers == 0:
        raise UserError("no decoder layers found (expected parameters named like 'model.layers.0....')")
    return Inventory(
        shapes=shapes,
        model_type=str(stock_model_type(config.model_type)),  # pruned_llama counts as llama does
        hidden_size=int(config.hidden_size),
        head_dim=int(head_dim),
        num_layers=int(num_layers),
        dtype=dtype,
        tied_embeddings=tied,
        source=source,
        arch_prefix=family.class_prefix if family else arch_prefix_for(config),
        block_types=block_types,
        family=family or GENERIC_FAMILY,
    )
