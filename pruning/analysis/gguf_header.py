"""A bounded reader of a GGUF file's header: the metadata keys analysis may ask for, and every tensor's
name, shape and type. No tensor data is read.

Why not ``gguf.GGUFReader``: it memory-maps the file and turns every value into numpy arrays as the
file declares them, so a string declaring 2^62 bytes raised a TypeError and an array declaring 2^40
entries looped for minutes through gigabytes. Here every length and count is checked against the bytes
left in the file before anything is read, allocated or looped over, and memory stays proportional to
the bytes actually present (arrays are decoded only for the keys analysis reads, and only up to
``MAX_LAYERS`` entries: they are per-layer counts). The rules are llama.cpp's own (``gguf.cpp``):
versions 2 and 3, no nested arrays, tensor names under 64 bytes and unique, at most 4 dimensions, rows
a whole number of the type's blocks, tensors packed in order at the alignment and inside the file; so
what is refused here llama.cpp refuses too. Every problem is a UserError naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from pruning.errors import UserError
from pruning.families.layout import MAX_LAYERS
from pruning.storage.fs import open_regular_file, os_error_reason

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # llama.cpp refuses version 1 (32-bit lengths) and anything newer than 3
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64, with the terminating NUL
MAX_DIMS = 4
MAX_INT64 = 2**63 - 1
STRING, ARRAY = 8, 9
# GGUF value types with a fixed size: struct code by type id
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INTEGERS = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
TYPE_NAMES = {
    **{0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool"},
    **{8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"},
}
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (a 0-d tensor, empty name)
MAX_KEPT_STRING = 256  # a string value analysis reads (the architecture) is a short name


@dataclass(frozen=True)
class Unread:
    """A value analysis does not decode (another type, or too long to be a per-layer array), described."""

    what: str


Value = int | float | bool | str | tuple[int, ...] | Unread


def describe(value: Value) -> str:
    """A value for an error message, on one line and short."""
    if isinstance(value, Unread):
        return value.what
    if isinstance(value, tuple):
        return f"an array of {len(value):,} integers"
    if isinstance(value, str):
        return f"the string {repr(value)[:80]}"
    return repr(value)


@dataclass(frozen=True)
class GgufTensor:
    name: str
    ne: tuple[int, ...]  # GGUF's order: innermost dimension first
    type_name: str  # ggml type, as gguf.GGMLQuantizationType names it (F32, Q8_0...)
    offset: int  # in the data section
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    values: dict[str, Value]  # only keys ``keep`` accepted
    tensors: list[GgufTensor]


def read_gguf_header(path: str | os.PathLike[str], keep: tuple[str, ...]) -> GgufHeader:
    """The header of the GGUF at ``path``, keeping the values of keys that equal or end with one of
    ``keep``. Refuses (UserError) anything but a regular file, without blocking on a FIFO."""
    file, size = _open_regular(path)
    with file:
        try:
            return _Parser(file, size, str(path), keep).header()
        except OSError as e:
            raise UserError(f"{path}: cannot read the GGUF file ({os_error_reason(e)})") from e


def _open_regular(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """The file, buffered, and its size (``storage.fs.open_regular_file``: regular files only)."""
    fd, info = open_regular_file(path, what="GGUF file")
    return os.fdopen(fd, "rb", buffering=1 << 16), info.st_size


class _Parser:
    """Reads forward through the file; ``pos`` and ``size`` bound every declared length."""

    def __init__(self, file: BinaryIO, size: int, path: str, keep: tuple[str, ...]) -> None:
        self.file, self.size, self.path, self.pos = file, size, path, 0
        self.keep = tuple(k.encode() for k in (*keep, "general.alignment"))
        self.order = "<"

    def fail(self, what: str) -> NoReturn:
        raise UserError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            left = self.size - self.pos
            self.fail(f"{what} would need {n:,} bytes at offset {self.pos:,}, but {left:,} remain")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.file.read(n)
        if len(data) != n:
            self.fail(f"the file ended at offset {self.pos + len(data):,} while read (it shrank)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.file.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, code: str, what: str) -> int | float | bool:
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.scalar("Q", f"the length of {what}"), what)

    # -- the three sections ----------------------------------------------------------------------------

    def header(self) -> GgufHeader:
        magic = self.take(4, "the magic number")
        if magic != MAGIC:
            self.fail(f"it starts with {magic!r}, not {MAGIC!r}")
        version = self.scalar("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            self.fail(f"version {version}; llama.cpp reads versions {' and '.join(map(str, VERSIONS))}")
        n_tensors = self.scalar("Q", "the tensor count")
        n_kv = self.scalar("Q", "the metadata count")
        self.need(n_kv * MIN_KV_BYTES, f"{n_kv:,} metadata entries")
        values = self.metadata(n_kv)
        self.need(n_tensors * MIN_TENSOR_INFO_BYTES, f"{n_tensors:,} tensor descriptions")
        tensors: dict[str, GgufTensor] = {}
        for i in range(n_tensors):
            tensor = self.tensor_info(i)
            if tensor.name in tensors:
                self.fail(f"tensor name {tensor.name!r} appears twice")
            tensors[tensor.name] = tensor
        self.check_data(list(tensors.values()), values.get("general.alignment", DEFAULT_ALIGNMENT))
        return GgufHeader(values, list(tensors.values()))

    def metadata(self, n_kv: int) -> dict[str, Value]:
        values: dict[str, Value] = {}
        for i in range(n_kv):
            raw = self.string(f"metadata key {i}")
            key = raw.decode("utf-8", "replace")
            kept = raw.endswith(self.keep)
            if kept and key in values:
                self.fail(f"metadata key {key!r} appears twice")
            vtype = self.scalar("I", f"the type of {key!r}")
            value = self.array(key, kept) if vtype == ARRAY else self.value(key, vtype, kept)
            if kept:
                values[key] = value
        return values

    def value(self, key: str, vtype: int, kept: bool) -> Value:
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], f"the value of {key!r}")
        if vtype != STRING:
            self.fail(f"metadata key {key!r} has unknown value type {vtype}")
        n = self.scalar("Q", f"the length of {key!r}")
        if kept and n <= MAX_KEPT_STRING:
            return self.take(n, f"the value of {key!r}").decode("utf-8", "replace")
        self.skip(n, f"the value of {key!r}")
        return Unread(f"a string of {n:,} bytes")

    def array(self, key: str, kept: bool) -> Value:
        itype = self.scalar("I", f"the entry type of {key!r}")
        count = self.scalar("Q", f"the entry count of {key!r}")
        what = f"the {count:,} entries of {key!r}"
        if itype in SCALARS:
            code = SCALARS[itype]
            nbytes = count * struct.calcsize(code)
            if kept and itype in INTEGERS and count <= MAX_LAYERS:
                return struct.unpack(f"{self.order}{count}{code}", self.take(nbytes, what))
            self.skip(nbytes, what)
        elif itype == STRING:
            self.need(count * 8, what)  # each string has at least its length
            self.skip_strings(count, key)
        elif itype == ARRAY:
            self.fail(f"metadata key {key!r} is an array of arrays, which llama.cpp does not read")
        else:
            self.fail(f"metadata key {key!r} is an array of unknown value type {itype}")
        return Unread(f"an array of {count:,} {TYPE_NAMES[itype]} values")

    def skip_strings(self, count: int, key: str) -> None:
        """``skip`` for each of ``count`` strings, inlined: a vocabulary has a few hundred thousand."""
        read, seek, unpack = self.file.read, self.file.seek, struct.Struct(self.order + "Q").unpack
        pos, size = self.pos, self.size
        for i in range(count):
            raw = read(8) if size - pos >= 8 else b""
            if len(raw) != 8:
                self.pos = pos
                self.need(8, f"the length of entry {i} of {key!r}")
                self.fail(f"the file ended at offset {pos:,} while read (it shrank)")
            (n,) = unpack(raw)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"entry {i} of {key!r}")
            seek(n, os.SEEK_CUR)
            pos += n
        self.pos = pos

    def tensor_info(self, i: int) -> GgufTensor:
        raw = self.string(f"the name of tensor {i}")
        if len(raw) > MAX_NAME_BYTES:
            self.fail(f"the name of tensor {i} has {len(raw):,} bytes; llama.cpp allows {MAX_NAME_BYTES}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"the name of tensor {i} ({raw!r}) is not UTF-8")
        n_dims = self.scalar("I", f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims:,} dimensions; llama.cpp allows {MAX_DIMS}")
        ne = tuple(self.scalar("Q", f"the shape of {name!r}") for _ in range(n_dims))
        type_id = self.scalar("I", f"the type of {name!r}")
        offset = self.scalar("Q", f"the data offset of {name!r}")
        type_name, nbytes = self.tensor_size(name, ne, type_id)
        return GgufTensor(name, ne, type_name, offset, nbytes)

    def tensor_size(self, name: str, ne: tuple[int, ...], type_id: int) -> tuple[str, int]:
        """The ggml type's name and the tensor's bytes, refusing what llama.cpp refuses."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            self.fail(f"tensor {name!r} has unknown ggml type {type_id}")
        elements = 1
        for n in ne:
            elements *= n
        if any(n > MAX_INT64 for n in ne) or elements > MAX_INT64:
            self.fail(f"tensor {name!r} has shape {list(ne)}, over 2^63 elements")
        if ne and ne[0] % block:
            self.fail(f"tensor {name!r} ({qtype.name}) has rows of {ne[0]:,}, not a multiple of {block}")
        return qtype.name, elements // block * type_size

    def check_data(self, tensors: list[GgufTensor], alignment: Value) -> None:
        """Tensors packed in order, each at the alignment, all inside the file (as llama.cpp requires)."""
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            self.fail(f"general.alignment is {describe(alignment)}, not a positive integer")
        if alignment & (alignment - 1):
            self.fail(f"general.alignment is {alignment:,}, not a power of 2")
        start = -(-self.pos // alignment) * alignment
        expected = 0
        for t in tensors:
            if t.offset != expected:
                self.fail(f"tensor {t.name!r} starts at data offset {t.offset:,}, expected {expected:,}")
            end = start + t.offset + t.nbytes
            if end > self.size:
                self.fail(
                    f"tensor {t.name!r} ({t.type_name} {list(t.ne)}) would end at byte {end:,}, "
                    f"but the file ends at {self.size:,}"
                )
            expected += -(-t.nbytes // alignment) * alignment
