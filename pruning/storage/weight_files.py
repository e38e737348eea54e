"""Which files hold a checkpoint's weights, and what their safetensors headers promise, checked.

Every reader of weights (the pipeline's source check, ``load_pruned_model``, the analysis) asks this
module first, so one set of rules holds everywhere:

- A ``model.safetensors.index.json`` is authoritative: every shard it names must exist and hold the
  tensors it maps there. A shard that is missing is an error, never "fewer layers".
- A header is believed only when it is consistent with the file: tensors tile the data buffer exactly
  (no holes, no overlaps, nothing past the end), and each byte range is ``numel x dtype size`` long.
- A pickle (``.bin``, ``.pt``, ...) is a weight file only with ``trust_pickle``; an index that points at
  one is refused without it, because transformers would ``torch.load`` it.

Pure Python (``json``, ``struct``): the analysis CLI imports it without torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.storage.json_files import read_json_object

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Suffixes of files that torch.load would unpickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)-of-(?P<total>\d+)\.safetensors$")

# Bytes per element of each safetensors dtype (sub-byte float formats are not checked by size).
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it (already checked against the file)."""

    dtype: str
    shape: tuple[int, ...]
    # where the bytes lie in the file, absolute (start, end): what a streamed read seeks to
    offsets: tuple[int, int] = field(compare=False)


@dataclass(frozen=True)
class WeightFiles:
    """The files that hold a checkpoint's weights: safetensors, or (only when trusted) pickles."""

    directory: Path
    safetensors: tuple[Path, ...] = ()
    pickles: tuple[Path, ...] = ()


def numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``, as a Python int (exact for any size a header may declare)."""
    return math.prod(int(d) for d in shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape, from a header that has been checked against the file's bytes."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{file}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise UserError(
                    f"{file}: truncated or corrupt safetensors header (declares {header_len} bytes)"
                )
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{file}: corrupt safetensors header ({type(e).__name__})") from e
    except IsADirectoryError as e:
        raise UserError(f"{file}: is a directory, not a safetensors file") from e
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror})") from e
    if not isinstance(header, dict):
        raise UserError(f"{file}: corrupt safetensors header (not a JSON object)")
    return _check_entries(file, header, size - 8 - header_len, 8 + header_len)


def _check_entries(
    file: Path, header: dict[str, Any], data_len: int, data_start: int
) -> dict[str, TensorInfo]:
    """The header's promises, checked: every byte range fits its shape and the ranges tile the data."""
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(info["shape"])
            begin, end = info["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end))
                and 0 <= begin <= end
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"{file}: corrupt safetensors header (entry {name!r})")
        if end > data_len:
            raise UserError(f"{file}: truncated safetensors file (tensor {name!r} ends past the file)")
        width = DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != numel(shape) * width:
            raise UserError(
                f"{file}: safetensors header lies about {name!r}: shape {list(shape)} of {dtype} needs "
                f"{numel(shape) * width} bytes, its byte range holds {end - begin}"
            )
        tensors[name] = TensorInfo(dtype, shape, (data_start + begin, data_start + end))
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise UserError(f"{file}: corrupt safetensors header (tensor {name!r} {problem})")
        position = end
    if position != data_len:
        raise UserError(
            f"{file}: corrupt safetensors file ({data_len - position} bytes after the last tensor)"
        )
    return tensors


def find_weight_files(directory: Path, *, trust_pickle: bool = False) -> WeightFiles:
    """The checkpoint's weight files; an error names whatever is missing, truncated or untrusted.

    The same order transformers' ``from_pretrained`` follows, so the files checked here are the files it
    loads: the file ``config.json`` names in ``transformers_weights``, then ``model.safetensors``, then
    ``model.safetensors.index.json``, then every ``*.safetensors`` (numbered shards must all be there),
    then, with ``trust_pickle`` only, pickles.
    """
    explicit = _explicit_weights(directory)
    if explicit is not None:
        return _explicit_files(directory, explicit, trust_pickle)
    if (directory / SAFE_WEIGHTS).is_file():
        return WeightFiles(directory, safetensors=(directory / SAFE_WEIGHTS,))
    index = directory / SAFE_INDEX
    if index.is_file():
        return _files_from_index(index, trust_pickle)
    found = tuple(sorted(p for p in directory.glob("*.safetensors") if p.is_file()))
    if found:
        _check_numbered_shards(directory, found)
        return WeightFiles(directory, safetensors=found)
    pickles = _pickled_weights(directory)
    if pickles and trust_pickle:
        return WeightFiles(directory, pickles=pickles)
    if pickles:
        names = ", ".join(p.name for p in pickles[:3])
        raise UserError(
            f"{directory}: holds only pickled weights ({names}); unpickling runs code stored in the file, "
            "so it is refused. Convert them to safetensors, or opt in with trust_pickle if you trust them"
        )
    return WeightFiles(directory)


def _explicit_weights(directory: Path) -> str | None:
    """``transformers_weights`` in config.json: transformers loads that file and ignores the others."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    name = read_json_object(config_file).get("transformers_weights")
    if name is None:
        return None
    if not isinstance(name, str) or Path(name).name != name:
        raise UserError(f"{config_file}: transformers_weights must name a file in {directory}, got {name!r}")
    return name


def _explicit_files(directory: Path, name: str, trust_pickle: bool) -> WeightFiles:
    path = directory / name
    if not path.is_file():
        raise UserError(f"{directory}: config.json names transformers_weights {name}, which is missing")
    if name.endswith(".safetensors.index.json"):
        return _files_from_index(path, trust_pickle)
    if name.endswith(".safetensors"):
        return WeightFiles(directory, safetensors=(path,))
    if not trust_pickle:
        raise UserError(
            f"{directory}: config.json names transformers_weights {name}, not a safetensors file; it would "
            "be unpickled, which runs code stored in it, so it is refused. Opt in with trust_pickle"
        )
    return WeightFiles(directory, pickles=(path,))


def _files_from_index(index: Path, trust_pickle: bool) -> WeightFiles:
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: no 'weight_map' object of tensor name -> file name")
    directory = index.parent
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).name != n]
    if outside:
        raise UserError(f"{index}: weight_map names files outside the checkpoint directory: {outside[:3]}")
    pickles = [n for n in names if not n.endswith(".safetensors")]
    strange = [n for n in pickles if Path(n).suffix not in PICKLE_SUFFIXES]
    if strange:
        raise UserError(f"{index}: weight_map names {strange[0]}, which is not a weight file (.safetensors)")
    if pickles and not trust_pickle:
        raise UserError(
            f"{index}: points at pickled weights ({', '.join(pickles[:3])}); unpickling runs code stored in "
            "the file, so it is refused. Convert them to safetensors, or opt in with trust_pickle"
        )
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UserError(
            f"{index}: shard {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete"
        )
    safe = tuple(directory / n for n in names if n.endswith(".safetensors"))
    for file in safe:  # the index's promise: each tensor is in the shard it names
        stored = read_header(file)
        absent = sorted(t for t, f in weight_map.items() if f == file.name and t not in stored)
        if absent:
            raise UserError(f"{index}: {file.name} lacks {absent[0]}, which the index says it holds")
    return WeightFiles(directory, safetensors=safe, pickles=tuple(directory / n for n in pickles))


def _check_numbered_shards(directory: Path, files: tuple[Path, ...]) -> None:
    """``model-00001-of-00003.safetensors`` names its siblings; without the index, all must be there."""
    for file in files:
        match = _SHARD_RE.match(file.name)
        if match:
            stem, total = match.group("stem"), match.group("total")
            width = len(total)
            for i in range(1, int(total) + 1):
                sibling = directory / f"{stem}-{i:0{width}d}-of-{total}.safetensors"
                if not sibling.is_file():
                    raise UserError(f"{directory}: shard {sibling.name} is missing (checkpoint incomplete)")


def _pickled_weights(directory: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()))


def stored_tensors(files: WeightFiles) -> dict[str, TensorInfo]:
    """Every tensor in the safetensors files (headers only; each header checked)."""
    tensors: dict[str, TensorInfo] = {}
    for file in files.safetensors:
        for name, info in read_header(file).items():
            if name in tensors:
                raise UserError(f"{file}: tensor {name!r} is stored in more than one shard")
            tensors[name] = info
    return tensors
