"""Read and write safetensors one tensor at a time, for models that never sit whole in memory.

``ShardReader`` reads a tensor's bytes with plain positioned reads into a fresh buffer, not through a
memory map: the buffer is the only copy in the process, and the page cache that backs the read is not
counted in (or pinned by) the process's resident memory, so reading 40 layers of a 13B model one by one
costs one layer of memory.

``ShardWriter`` writes tensors in any order into shards whose headers are written first: a safetensors
header (names, dtypes, shapes, byte ranges) precedes the data, so every tensor must be declared up
front; the pruned model's skeleton on the meta device knows them all before any weight is pruned.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning.errors import UserError
from pruning.storage.fs import os_error_reason
from pruning.storage.weight_files import TensorInfo, WeightFiles, numel, read_header

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}  # fmt: skip  (every safetensors dtype torch has; F4 and F6 have none: refused by name)
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ShardReader:
    """Tensors of a checkpoint's safetensors files, read by name (headers are read and checked once)."""

    def __init__(self, files: WeightFiles) -> None:
        self.where: dict[str, tuple[Path, TensorInfo]] = {}
        for file in files.safetensors:
            for name, info in read_header(file).items():
                if info.dtype not in TORCH_DTYPES:
                    raise UserError(f"{file}: {name} is stored as {info.dtype}, which torch cannot hold")
                self.where[name] = (file, info)

    def read(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The tensor, cast to ``dtype`` if it is floating (as ``from_pretrained(dtype=...)`` casts)."""
        if name not in self.where:
            raise UserError(f"the model's weights hold no tensor {name}")
        file, info = self.where[name]
        begin, end = info.offsets
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        try:
            with open(file, "rb", buffering=0) as f:
                done = 0
                while done < len(view):
                    got = os.preadv(f.fileno(), [view[done:]], begin + done)
                    if got == 0:
                        raise UserError(
                            f"{file}: the file ended while reading {name} (truncated since the run began?)"
                        )
                    done += got
        except OSError as e:  # deleted, or replaced by a directory, since its header was checked
            raise UserError(
                f"{file}: cannot read {name} ({os_error_reason(e)}); was it removed or replaced since the "
                "run began?"
            ) from e
        tensor = buffer.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise UserError(f"{file}: {name} holds NaN or infinite values; the source weights are broken")
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
            if not _all_finite(tensor):
                raise UserError(
                    f"{file}: {name} holds values beyond the range of {str(dtype).removeprefix('torch.')}; "
                    "choose a wider model.dtype (bfloat16 or float32)"
                )
        return tensor.to(device)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity: the extremes carry both (NaN propagates through min and max), in one
    pass and no allocation, 20x faster than ``isfinite(t).all()`` on bf16 (which builds a mask)."""
    if tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor)
    except RuntimeError:  # a dtype aminmax does not take (float8): widened, then
        return _all_finite(tensor.float())
    return bool(torch.isfinite(low) and torch.isfinite(high))


@dataclass(frozen=True)
class _Slot:
    file: str
    offset: int  # absolute, in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class ShardWriter:
    """Writes declared tensors into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own),
    named as transformers names them; the index is written by ``close``, which checks every declared
    tensor was written exactly once. Shards fill in declaration order, as transformers fills them;
    within a shard, wider elements come first so every tensor starts aligned to its element size."""

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
    ) -> None:
        self.directory = directory
        self.slots: dict[str, _Slot] = {}
        self.total_bytes = 0
        self._written: set[str] = set()
        self._files: dict[str, int] = {}
        headers = self._layout(tensors, max_shard_bytes)  # every header before any file is opened
        try:
            for file, (raw, size) in headers.items():
                fd = os.open(directory / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                self._files[file] = fd
                os.pwrite(fd, raw, 0)
                os.ftruncate(fd, len(raw) + size)
        except BaseException:
            self.abort()
            raise

    def _layout(
        self, tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
    ) -> dict[str, tuple[bytes, int]]:
        """File name -> (header bytes with their length prefix, data bytes); fills ``self.slots``."""
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: {dtype} has no safetensors name")
            nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        headers: dict[str, tuple[bytes, int]] = {}
        for number, group in enumerate(groups, start=1):
            file = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            group.sort(key=lambda entry: -torch.empty((), dtype=entry[1]).element_size())  # stable
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offsets, position = {}, 0
            for name, dtype, shape, nbytes in group:
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [position, position + nbytes],
                }
                offsets[name] = position
                position += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            start = 8 + len(raw)
            for name, dtype, shape, nbytes in group:
                self.slots[name] = _Slot(file, start + offsets[name], dtype, shape, nbytes)
            headers[file] = (len(raw).to_bytes(8, "little") + raw, position)
            self.total_bytes += position
        return headers

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise RuntimeError(f"{name} was not declared to the shard writer")
        if name in self._written:
            raise RuntimeError(f"{name} written twice")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise RuntimeError(
                f"{name}: declared {slot.dtype}{list(slot.shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        while done < slot.nbytes:
            done += os.pwrite(self._files[slot.file], view[done:], slot.offset + done)
        self._written.add(name)

    def close(self) -> None:
        """Flush and close the shards and write the index; raises if a declared tensor is missing."""
        try:
            for fd in self._files.values():
                os.fsync(fd)
        finally:
            self.abort()
        missing = sorted(set(self.slots) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} declared tensors were never written: {missing[:5]}")
        files = {slot.file for slot in self.slots.values()}
        if len(files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: slot.file for name, slot in sorted(self.slots.items())},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Close every shard still open, each once (the caller removes the partial directory)."""
        while self._files:
            _, fd = self._files.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)
