"""Save a pruned model: safetensors weights, ``config.json`` in the format its shapes call for, its
tokenizer, and the modeling code a pruned layout needs; then read it all back and check it.

A pruned layer has its own head count and intermediate size, which a stock config cannot express, so
``config.json`` keeps the dense top-level values and adds ``pruning_layout`` (``pruning.families.layout``):
per-layer lists of ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``, 0 meaning
the block (and the norms serving it) was removed. Such a checkpoint also carries the modeling code that
builds it, so that transformers loads it with ``trust_remote_code=True``; a model whose layers all have
the same sizes gets a stock config instead (``pruning.checkpoint.config_json``,
docs/checkpoint-format.md). The writer owns the self-check (``verify_saved``): a checkpoint that does not
read back as the model in memory is never published.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from pruning.checkpoint.config_json import (
    PRUNED_ARCHITECTURE,
    REMOTE_CODE_FILE,
    pruned_format,
    stock_format,
    uniform_sizes,
    write_remote_code,
)
from pruning.checkpoint.load import build_pruned_skeleton
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.families.layout import LAYOUT_KEY, Layout, stock_model_type
from pruning.storage.fs import current_umask
from pruning.storage.json_files import read_json_object
from pruning.storage.shards import SAFETENSORS_DTYPES
from pruning.storage.weight_files import PICKLE_SUFFIXES, find_weight_files, stored_tensors
from pruning.surgery import pruned_layout

logger = logging.getLogger(__name__)


def partial_dir(out_dir: str | os.PathLike[str]) -> Path:
    """A new hidden sibling of ``out_dir`` where a checkpoint is written before it is renamed into place."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty; choose another or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def save_pruned_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: str | int = "50GB",
    weights_dir: Path | None = None,
) -> Path:
    """Write weights (safetensors), config, generation config and tokenizer.

    ``config.json`` is a stock config when every layer has the same sizes and no block is gone, else
    the pruned format (``pruning_layout``) with ``modeling_pruned.py`` beside it, for
    ``from_pretrained(..., trust_remote_code=True)``; see ``pruning.checkpoint.config_json``.

    Everything goes to a hidden sibling directory that is renamed to ``out_dir`` only when complete, so
    an interrupted run never leaves a directory that looks like a finished checkpoint. Before the rename
    the files are read back and checked against the model in memory (``verify_saved``): the writer owns
    that check, so it holds whatever hooks are configured.

    ``weights_dir`` is such a sibling (``partial_dir``) that already holds the weights, written layer by
    layer by a streamed run (``pruning.source.streaming.prune_and_write``); the model may then be on meta.
    """
    out = Path(out_dir)
    tmp = weights_dir if weights_dir is not None else partial_dir(out)
    try:
        if weights_dir is None:
            # transformers 5 always writes safetensors and stores tied weights once.
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            _save_configs(model, tmp)
        _write_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        stray = [p.name for p in tmp.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if stray:
            raise RuntimeError(f"refusing to publish a checkpoint with pickled files: {stray}")
        verify_saved(model, tmp)
        _apply_umask(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("saved pruned model to %s", out)
    return out


def _save_configs(model: nn.Module, directory: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them (for weights written
    elsewhere): the class in ``architectures`` and the parameters' dtype."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _write_config(model: nn.Module, directory: Path) -> None:
    """Rewrite ``config.json`` in the format the model's shapes call for, sizes fresh from the weights
    (a config loaded from an older checkpoint may carry an old layout).

    The stock format is written only when the family's stock classes, built from it, have exactly the
    model's shapes: a config class may refuse a head count that does not divide ``hidden_size`` (Llama,
    Gemma), and such a model keeps the pruned format, which needs ``trust_remote_code``.
    """
    path = directory / "config.json"
    config = read_json_object(path)
    adapter = adapter_for(model.config)
    layout, head_dim = pruned_layout(model), adapter.head_dim(model.config)
    sizes = uniform_sizes(layout)
    written = None
    if sizes is not None:
        candidate = stock_format(config, sizes, head_dim)
        problem = _stock_problem(model, candidate)
        if problem is None:
            written = candidate
            if written.get("architectures") == [PRUNED_ARCHITECTURE]:  # a model loaded with the shipped code
                written["architectures"] = [type(build_pruned_skeleton(written)).__name__]
        else:
            logger.warning(
                "every layer has the same sizes, but %s; writing the pruned format, which transformers "
                "loads with trust_remote_code=True",
                problem,
            )
    code = directory / REMOTE_CODE_FILE
    if written is None:
        written = pruned_format(config, layout, adapter, head_dim)
        write_remote_code(directory, stock_model_type(written["model_type"]))
    elif code.exists():  # save_pretrained of a model loaded with the shipped code copies that code
        code.unlink()
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _stock_problem(model: nn.Module, config: dict[str, Any]) -> str | None:
    """Why the family's stock classes would not build the model from this stock config (None: they do)."""
    try:
        skeleton = build_pruned_skeleton(config)
    except (ValueError, TypeError, UserError, StrictDataclassError) as e:  # what config validation raises
        detail = str(e).strip().splitlines()
        return f"transformers refuses the stock config ({detail[-1].strip() if detail else type(e).__name__})"
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    built = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    differ = sorted(name for name in expected.keys() | built.keys() if expected.get(name) != built.get(name))
    if differ:
        return f"the stock classes build {differ[0]} as {built.get(differ[0])}, not {expected.get(differ[0])}"
    return None


def _apply_umask(directory: Path) -> None:
    """Give every file the mode a plain ``open`` gives (safetensors writes 0600 whatever the umask)."""
    mode = 0o666 & ~current_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def verify_saved(model: nn.Module, directory: Path) -> None:
    """The files in ``directory`` hold exactly the model's tensors (names, shapes, dtypes) and its layout.

    Read from the headers the way a loader reads them, so a writer bug (a tensor dropped or reshaped, a
    layout out of step with the weights) fails the save instead of reaching a user. Raises RuntimeError:
    a mismatch here is this package's bug, not the user's input.
    """
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    expected = {name: t for name, t in model.state_dict().items() if name not in tied}
    stored = stored_tensors(find_weight_files(directory))
    problems = [f"{name} not saved" for name in sorted(set(expected) - set(stored))]
    problems += [f"{name} saved but not in the model" for name in sorted(set(stored) - set(expected))]
    for name in sorted(set(expected) & set(stored)):
        tensor, info = expected[name], stored[name]
        if (
            tuple(tensor.shape) != info.shape
            or SAFETENSORS_DTYPES.get(tensor.dtype, info.dtype) != info.dtype
        ):
            problems.append(
                f"{name}: {info.dtype}{list(info.shape)} on disk, {tensor.dtype}{list(tensor.shape)}"
            )
    problems += _config_problems(model, directory)
    if problems:
        raise RuntimeError(f"saved checkpoint differs from the model in memory: {problems[:5]}")
    logger.info("saved %d tensors and the layer sizes, checked against the model in memory", len(stored))


def _config_problems(model: nn.Module, directory: Path) -> list[str]:
    """``config.json`` gives every layer the model's sizes (from its layout, or the top-level sizes of a
    stock config), its head width and family; a layout comes with the code that builds it."""
    saved = read_json_object(directory / "config.json")
    adapter = adapter_for(model.config)
    problems = []
    try:
        sizes = Layout.of(adapter.layer_sizes(saved))
    except (ValueError, KeyError, TypeError) as e:
        return [f"config.json has no readable layer sizes: {e}"]
    if sizes != pruned_layout(model):
        problems.append("config.json's layer sizes differ from the model's shapes")
    if adapter.head_dim(saved) != adapter.head_dim(model.config):
        problems.append(
            f"config.json head_dim {adapter.head_dim(saved)}, the model's {adapter.head_dim(model.config)}"
        )
    if stock_model_type(saved.get("model_type")) != stock_model_type(model.config.model_type):
        problems.append(
            f"config.json model_type {saved.get('model_type')!r}, the model's {model.config.model_type!r}"
        )
    if saved.get(LAYOUT_KEY) and not (directory / REMOTE_CODE_FILE).is_file():
        problems.append(f"config.json has a {LAYOUT_KEY} but {REMOTE_CODE_FILE} is missing")
    return problems
