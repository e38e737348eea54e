"""Which files hold a checkpoint's weights, and what their safetensors headers promise, checked.

Every reader of weights (the pipeline's source check, ``load_pruned_model``, the analysis) asks this
module first, so one set of rules holds everywhere:

- A ``model.safetensors.index.json`` is authoritative: every shard it names must exist and hold the
  tensors it maps there. A shard that is missing is an error, never "fewer layers".
- A header is believed only when the safetensors library would read it, and it is consistent with the
  file: a known dtype, each byte range exactly ``numel x dtype bits / 8`` bytes (whole bytes, sub-byte
  dtypes included), tensors tiling the data buffer exactly (no holes, no overlaps, nothing past the
  end), and ``__metadata__`` an object of strings. Whatever checks a header here first (the dry run,
  the run's preflight, ``load_pruned_model``, the analysis) then refuses a file the way the real read
  would, in one line, instead of a ``SafetensorError`` traceback later.
- A pickle (``.bin``, ``.pt``, ...) is a weight file only with ``trust_pickle``; an index that points at
  one is refused without it, because transformers would ``torch.load`` it.

Pure Python (``json``, ``struct``): the analysis CLI imports it without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.storage.fs import os_error_reason
from pruning.storage.json_files import read_json_object

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Suffixes of files that torch.load would unpickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)-of-(?P<total>\d+)\.safetensors$")
# The library reads sizes as 64-bit unsigned integers and refuses a shape whose product overflows.
_USIZE_LIMIT = 2**64

# Bits per element of every dtype the safetensors format defines (its ``Dtype::bitsize``, safetensors
# 0.8). A name not listed here is refused: the library would refuse it too ("unknown variant"), and a
# size this module cannot check is a size nobody should count.
DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I8": 8, "U8": 8, "BOOL": 8,
    "F6_E2M3": 6, "F6_E3M2": 6,
    "F4": 4,
}  # fmt: skip
# The ones torch has no dtype for (storage.shards.TORCH_DTYPES holds the rest): a source in them cannot
# be loaded, and the preflight says so before loading, as the run would.
NO_TORCH_DTYPE = ("F4", "F6_E2M3", "F6_E3M2")


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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise UserError(f"{file}: corrupt safetensors header ({type(e).__name__})") from e
    except IsADirectoryError as e:
        raise UserError(f"{file}: is a directory, not a safetensors file") from e
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror})") from e
    if not isinstance(header, dict):
        raise UserError(f"{file}: corrupt safetensors header (not a JSON object)")
    return _check_entries(file, header, size - 8 - header_len, 8 + header_len)


def _check_metadata(file: Path, metadata: Any) -> None:
    """``__metadata__`` is absent, null or an object whose values are strings: the library reads it as a
    map of string to string and refuses anything else when it loads, so it is refused here first."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise UserError(
            f"{file}: corrupt safetensors header (__metadata__ is a {type(metadata).__name__}, not an "
            "object of strings)"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise UserError(
                f"{file}: corrupt safetensors header (__metadata__ {key[:60]!r} is a {type(value).__name__}, "
                "not a string)"
            )


def _check_entries(
    file: Path, header: dict[str, Any], data_len: int, data_start: int
) -> dict[str, TensorInfo]:
    """The header's promises, checked: every byte range fits its shape and the ranges tile the data."""
    _check_metadata(file, header.get("__metadata__"))
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
        needed = _byte_size(file, name, dtype, shape)
        if end - begin != needed:
            raise UserError(
                f"{file}: safetensors header lies about {name!r}: shape {_shape_text(shape)} of {dtype} "
                f"needs {needed} bytes, its byte range holds {end - begin}"
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


def _byte_size(file: Path, name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes the tensor occupies as the safetensors library computes them: ``numel x bits / 8``, in
    whole bytes, with every factor and partial product a 64-bit size. Without this a sub-byte or
    unknown dtype let a header declare 10^24 elements in 0 bytes, and the analysis counted them."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise UserError(
            f"{file}: tensor {name!r} has dtype {dtype[:40]!r}, which the safetensors format does not "
            f"define (known: {', '.join(DTYPE_BITS)})"
        )
    count = 1
    for dim in shape:
        count *= dim
        if dim >= _USIZE_LIMIT or count >= _USIZE_LIMIT:
            count = _USIZE_LIMIT  # the library stops here too (checked_mul)
            break
    if count * bits >= _USIZE_LIMIT:
        raise UserError(
            f"{file}: corrupt safetensors header (tensor {name!r}: shape {_shape_text(shape)} of "
            f"{dtype} overflows the format's 64-bit sizes)"
        )
    if count * bits % 8:
        raise UserError(
            f"{file}: corrupt safetensors header (tensor {name!r}: shape {_shape_text(shape)} of {dtype} is "
            f"{count * bits} bits, not a whole number of bytes)"
        )
    return count * bits // 8


def _shape_text(shape: tuple[int, ...]) -> str:
    """A shape for a one-line message (a forged header may give thousands of dimensions)."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ... ({len(shape)} dimensions)]"


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
    if _is_weight_file(directory / SAFE_WEIGHTS):
        return WeightFiles(directory, safetensors=(directory / SAFE_WEIGHTS,))
    index = directory / SAFE_INDEX
    if _is_weight_file(index):
        return _files_from_index(index, trust_pickle)
    found = tuple(sorted(p for p in directory.glob("*.safetensors") if _is_weight_file(p)))
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


def _is_weight_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (through links); absent is False. Anything else at a weight
    file's name (a FIFO, a directory, a device such as a link to /dev/zero, a dangling link) is refused
    by name: skipped, the run would find "no weights" after the dry run had said OK, or read forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not os.path.islink(path):
            return False
        raise UserError(f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({os_error_reason(e)})") from e
    if stat.S_ISREG(mode):
        return True
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
    raise UserError(f"{path}: is {kind}, not a weights file")


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
    if not _is_weight_file(path):
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
    missing = [n for n in names if not _is_weight_file(directory / n)]
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
