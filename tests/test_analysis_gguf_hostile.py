"""A hostile or broken ``.gguf`` given to ``python -m pruning.analysis`` is one line, exit code 2, at once
and in little memory: every length and count the file declares is checked against the bytes it has
before anything is read, allocated or looped over (pruning/analysis/gguf_header.py). Each file is built
by hand, byte by byte, from a small valid one."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import gguf  # noqa: F401  (imported before the memory is traced: the reader imports it lazily)
import pytest

from pruning.analysis.cli import main
from pruning.analysis.gguf_header import read_gguf_header
from pruning.errors import UserError

F32, ALIGN = 0, 32
HUGE_STRING = 2**62
HUGE_ARRAY = 2**40


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, 4, struct.pack("<I", value))


def u32_array(key: str, values: list[int], declared: int | None = None) -> bytes:
    count = len(values) if declared is None else declared
    return kv(key, 9, struct.pack("<IQ", 4, count) + struct.pack(f"<{len(values)}I", *values))


BASE_KV = [
    kv("general.architecture", 8, text("llama")),
    u32("llama.block_count", 1),
    u32("llama.embedding_length", 8),
    u32("llama.attention.head_count", 2),
    u32("llama.attention.head_count_kv", 1),
    u32("llama.attention.key_length", 4),
]
# (name, ne innermost-first): hidden 8, vocab 10, 2 heads and 1 KV head of width 4
BASE_TENSORS = [
    ("token_embd.weight", (8, 10)),
    ("blk.0.attn_q.weight", (8, 8)),
    ("blk.0.attn_k.weight", (8, 4)),
]


def info(name: str | bytes, ne: tuple[int, ...], offset: int, ttype: int = F32) -> bytes:
    return text(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ttype, offset)


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def gguf_bytes(
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    head: bytes = b"GGUF" + struct.pack("<I", 3),
    data: int = 0,
) -> bytes:
    """A GGUF: the base metadata and F32 tensors (packed in order, data zeros) unless replaced; with
    other tensors, ``data`` bytes of zeros for their data."""
    kvs = BASE_KV if kvs is None else kvs
    if tensors is None:
        tensors = []
        for name, ne in BASE_TENSORS:
            tensors.append(info(name, ne, data))
            data += padded(4 * ne[0] * ne[1])
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    header = head + struct.pack("<QQ", n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return header + bytes(padded(len(header)) - len(header) + data)


def analyse(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], float, int]:
    """Exit code, stderr lines, seconds and peak traced bytes of the CLI on ``path``, in-process."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = main(["--model_path", str(path)])
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return code, capsys.readouterr().err.strip().splitlines(), seconds, peak


def refused(path: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code, lines, seconds, peak = analyse(path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: "), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert seconds < 5 and peak < 32 * 2**20, (seconds, peak)
    return lines[0]


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_hand_built_file_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The base every hostile file below departs from analyses cleanly: the refusals are the damage's."""
    code, lines, _, _ = analyse(write(tmp_path, gguf_bytes()), capsys)
    assert code == 0 and lines == []
    header = read_gguf_header(tmp_path / "m.gguf", (".block_count",))
    assert [t.name for t in header.tensors] == [name for name, _ in BASE_TENSORS]
    assert header.values == {"llama.block_count": 1}


def _with_kv(extra: bytes) -> bytes:
    return gguf_bytes([*BASE_KV, extra])


CASES = {
    # a value, a key, a tensor name declaring 2^62 bytes: TypeError in gguf's reader before
    "huge_string_value": (
        lambda: _with_kv(kv("general.name", 8, struct.pack("<Q", HUGE_STRING))),
        "4,611,686",
    ),
    "huge_key": (lambda: _with_kv(struct.pack("<Q", HUGE_STRING)), "metadata key 6 would need 4,611,686"),
    "huge_tensor_name": (
        lambda: gguf_bytes(tensors=[struct.pack("<Q", HUGE_STRING) + bytes(64)]),
        "tensor 0",
    ),
    # 2^40 entries: gguf's reader looped through 1.5 GB for minutes
    "huge_array": (
        lambda: _with_kv(u32_array("tokenizer.ggml.token_type", [], HUGE_ARRAY)),
        "1,099,511,627,776",
    ),
    "huge_string_array": (
        lambda: _with_kv(kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, HUGE_ARRAY))),
        "1,099,511,627,776 entries",
    ),
    "string_array_entry_too_long": (
        lambda: _with_kv(
            kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + text("a") + struct.pack("<Q", 2**62))
        ),
        "entry 1 of 'tokenizer.ggml.tokens' would need 4,611,686",
    ),
    "huge_kept_array": (lambda: _with_kv(u32_array("llama.feed_forward_length", [], HUGE_ARRAY)), "entries"),
    "absurd_kv_count": (lambda: gguf_bytes(n_kv=2**60), "metadata entries"),
    "absurd_tensor_count": (lambda: gguf_bytes(n_tensors=2**60), "tensor descriptions"),
    "huge_n_dims": (
        lambda: gguf_bytes(tensors=[text("t") + struct.pack("<I", 2**31) + bytes(64)]),
        "2,147,483,648 dimensions",
    ),
    "huge_dimension": (lambda: gguf_bytes(tensors=[info("t", (2**63, 1), 0)]), "over 2^63 elements"),
    "unknown_value_type": (lambda: _with_kv(kv("general.x", 13, b"\0" * 8)), "unknown value type 13"),
    "unknown_array_type": (
        lambda: _with_kv(kv("general.x", 9, struct.pack("<IQ", 99, 0))),
        "unknown value type 99",
    ),
    "nested_array": (lambda: _with_kv(kv("general.x", 9, struct.pack("<IQ", 9, 1))), "array of arrays"),
    "unknown_tensor_type": (lambda: gguf_bytes(tensors=[info("t", (8,), 0, ttype=4)]), "unknown ggml type 4"),
    "rows_not_whole_blocks": (
        lambda: gguf_bytes(tensors=[info("t", (33, 2), 0, ttype=8)]),
        "not a multiple of 32",
    ),
    "long_tensor_name": (lambda: gguf_bytes(tensors=[info("x" * 64, (8,), 0)]), "64 bytes"),
    "duplicate_tensor": (
        lambda: gguf_bytes(tensors=[info("t", (8,), 0), info("t", (8,), 32)]),
        "appears twice",
    ),
    "duplicate_key": (lambda: _with_kv(u32("llama.block_count", 1)), "'llama.block_count' appears twice"),
    "shape_beyond_the_data": (lambda: gguf_bytes(tensors=[info("t", (8, 2**20), 0)]), "but the file ends at"),
    "overlapping_tensors": (
        lambda: gguf_bytes(tensors=[info("a", (8,), 0), info("b", (8,), 0)], data=64),
        "starts at data offset 0, expected 32",
    ),
    "bad_magic": (lambda: b"GGML" + gguf_bytes()[4:], "starts with b'GGML'"),
    "version_1": (lambda: gguf_bytes(head=b"GGUF" + struct.pack("<I", 1)), "version 1"),
    "alignment_not_power_of_2": (lambda: _with_kv(u32("general.alignment", 24)), "not a power of 2"),
    "alignment_a_string": (lambda: _with_kv(kv("general.alignment", 8, text("32"))), "the string '32'"),
    "truncated_header": (lambda: gguf_bytes()[:150], "remain"),
    "truncated_data": (lambda: gguf_bytes()[:-40], "but the file ends at"),
    "empty_file": (lambda: b"", "the magic number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_header_is_one_line_at_once(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, needle = CASES[case]
    line = refused(write(tmp_path, build()), capsys, needle)
    assert "not a valid GGUF file" in line


def _meta(replace: dict[str, bytes]) -> bytes:
    """The base metadata with the entries of some keys replaced, or others added."""
    kvs = {entry[8 : 8 + struct.unpack("<Q", entry[:8])[0]].decode(): entry for entry in BASE_KV}
    return gguf_bytes(list({**kvs, **replace}.values()))


METADATA_CASES = {
    "no_architecture": ({"general.architecture": u32("general.x", 1)}, "has no general.architecture"),
    "architecture_with_a_newline": (
        {"general.architecture": kv("general.architecture", 8, text("llama\nerror: forged"))},
        "not an architecture name",
    ),
    "block_count_absurd": ({"llama.block_count": u32("llama.block_count", 2**31)}, "at most 10,000"),
    "block_count_zero": ({"llama.block_count": u32("llama.block_count", 0)}, "not a positive integer"),
    "head_count_a_string": (
        {"llama.attention.head_count": kv("llama.attention.head_count", 8, text("2"))},
        "is the string '2', not a count",
    ),
    "per_layer_array_too_short": (
        {
            "llama.block_count": u32("llama.block_count", 2),
            "llama.attention.head_count": u32_array("llama.attention.head_count", [2]),
        },
        "has 1 entries, but there are 2 blocks",
    ),
    "heads_disagree_with_weights": (
        {"llama.attention.head_count": u32("llama.attention.head_count", 3)},
        "blk.0.attn_q.weight has 8 rows, but llama.attention.head_count[0] is 3 (4 rows each)",
    ),
    "layer_missing": (
        {"llama.block_count": u32("llama.block_count", 2)},
        "blk.1.attn_q.weight is missing, but llama.attention.head_count[1] is 2",
    ),
    "split_shard": ({"split.count": kv("split.count", 2, struct.pack("<H", 3))}, "one of 3 shards"),
    "no_head_width": (
        {
            "llama.attention.key_length": u32("general.x", 1),
            "llama.attention.head_count": u32("llama.attention.head_count", 0),
        },
        "the head width cannot be derived from llama.attention.head_count (0)",
    ),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_metadata_that_cannot_be_counted_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replace, needle = METADATA_CASES[case]
    refused(write(tmp_path, _meta(replace)), capsys, needle)


def test_a_tensor_past_the_block_count_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = [info("blk.0.attn_q.weight", (8, 8), 0), info("blk.0.attn_k.weight", (8, 4), 256)]
    tensors.append(info("blk.7.attn_q.weight", (8, 8), 384))
    refused(
        write(tmp_path, gguf_bytes(tensors=tensors, data=1024)),
        capsys,
        "'blk.7.attn_q.weight' is past the 1 blocks of llama.block_count",
    )


def test_a_fifo_is_refused_without_blocking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    refused(fifo, capsys, "not a regular file")
    other = tmp_path / "model"  # any other path that is a FIFO: refused as well, never opened
    os.mkfifo(other)
    refused(other, capsys, "not a regular file")


def test_the_reader_checks_the_open_file_itself(tmp_path: Path) -> None:
    """A FIFO put in a file's place after the CLI looked at it: the open descriptor is what is checked."""
    fifo = tmp_path / "swapped.gguf"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        read_gguf_header(fifo, ())
    with pytest.raises(UserError, match="is a directory, not a GGUF file"):
        read_gguf_header(tmp_path, ())
