"""Weight files are believed only when complete and consistent: shard index, headers, pickle guard."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pruning.errors import UserError
from pruning.storage.weight_files import find_weight_files, read_header, stored_tensors


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly the header and bytes given (so it can lie)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def sharded(directory: Path, index_map: dict[str, str] | None = None) -> Path:
    """Two real shards and an index mapping tensor -> shard (or a given mapping)."""
    directory.mkdir()
    save_file({"a": torch.zeros(2, 3)}, directory / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(4)}, directory / "model-00002-of-00002.safetensors")
    weight_map = index_map or {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_a_real_file_is_read(tmp_path: Path):
    save_file({"w": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(5)}, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {"w": ("BF16", (3, 5)), "b": ("F32", (5,))}


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "lies about 'w'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "ends past the file"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "4 bytes after the last"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps another tensor",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, "corrupt"),
        ({"w": "nonsense"}, b"", "corrupt"),
    ],
    ids=[
        "shape-vs-bytes",
        "truncated",
        "trailing",
        "overlap",
        "gap",
        "negative-dim",
        "reversed",
        "not-object",
    ],
)
def test_lying_or_broken_headers_are_refused(tmp_path: Path, header: dict, data: bytes, needle: str):
    file = write_raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(UserError, match=needle) as info:
        read_header(file)
    assert str(file) in str(info.value)


def _one(dtype: str, shape: list, size: int, **extra) -> tuple[dict, bytes]:
    """A header of one tensor ``w`` whose byte range is ``size`` bytes, and those bytes."""
    return {**extra, "w": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}, b"\0" * size


# Headers the safetensors library refuses (finding 9: a sub-byte tensor of 10^24 elements in 0 bytes
# was counted by the analysis; finding 7: non-string metadata passed the dry run and failed the run).
REFUSED = {
    "sub-byte-in-no-bytes": (_one("F4", [10**6, 10**6], 0), "lies about 'w': shape [1000000, 1000000] of F4"),
    "sub-byte-overflow": (_one("F4", [10**12, 10**12], 0), "overflows the format's 64-bit sizes"),
    "half-a-byte": (_one("F4", [3], 2), "F4 is 12 bits, not a whole number of bytes"),
    "six-bit-short": (_one("F6_E2M3", [4], 2), "needs 3 bytes, its byte range holds 2"),
    "unknown-dtype": (_one("U4", [2], 1), "dtype 'U4', which the safetensors format does not define"),
    "one-bit-int": (_one("I1", [8], 1), "dtype 'I1', which the safetensors format does not define"),
    "float-dim": (_one("F32", [2.0], 8), "corrupt safetensors header (entry 'w')"),
    "bool-dim": (_one("F32", [True], 4), "corrupt safetensors header (entry 'w')"),
    "dim-past-64-bits": (_one("F32", [0, 2**64], 0), "overflows the format's 64-bit sizes"),
    "product-past-64-bits": (_one("F32", [2**62, 8, 0], 0), "overflows the format's 64-bit sizes"),
    "metadata-int": (_one("F32", [1], 4, __metadata__={"format": 5}), "__metadata__ 'format' is a int"),
    "metadata-nested": (_one("F32", [1], 4, __metadata__={"a": {"b": "c"}}), "__metadata__ 'a' is a dict"),
    "metadata-list": (_one("F32", [1], 4, __metadata__=["x"]), "__metadata__ is a list, not an object"),
}
ACCEPTED = {
    "four-bit-pair": _one("F4", [1, 2], 1),
    "six-bit": _one("F6_E3M2", [4], 3),
    "e8m0": _one("F8_E8M0", [3], 3),
    "complex": _one("C64", [1], 8),
    "empty-of-a-huge-dim": _one("F32", [0, 2**63], 0),
    "metadata-null": _one("F32", [1], 4, __metadata__=None),
    "metadata-strings": _one("F32", [1], 4, __metadata__={"format": "pt"}),
}


@pytest.mark.parametrize(("case", "needle"), list(REFUSED.values()), ids=list(REFUSED))
def test_headers_the_library_refuses_are_refused_in_one_line(tmp_path: Path, case: tuple, needle: str):
    file = write_raw(tmp_path / "x.safetensors", *case)
    with pytest.raises(UserError, match=re.escape(needle)) as info:
        read_header(file)
    assert str(info.value).startswith(f"{file}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("case", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_every_dtype_and_metadata_the_library_reads_is_read(tmp_path: Path, case: tuple):
    header, _ = case
    info = read_header(write_raw(tmp_path / "x.safetensors", *case))["w"]
    assert (info.dtype, list(info.shape)) == (header["w"]["dtype"], header["w"]["shape"])


@pytest.mark.parametrize(
    "case", [case for case, _ in REFUSED.values()] + list(ACCEPTED.values()), ids=[*REFUSED, *ACCEPTED]
)
def test_the_header_check_agrees_with_the_safetensors_library(tmp_path: Path, case: tuple):
    """What ``read_header`` believes is what ``safe_open`` opens, so no reader meets the library's error."""
    file = write_raw(tmp_path / "x.safetensors", *case)
    try:
        with safe_open(file, "pt"):
            library = True
    except SafetensorError:
        library = False
    try:
        ours = bool(read_header(file))
    except UserError:
        ours = False
    assert ours == library


def test_header_length_past_the_end(tmp_path: Path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(UserError, match="truncated or corrupt safetensors header"):
        read_header(file)


def test_index_lists_every_shard(tmp_path: Path):
    files = find_weight_files(sharded(tmp_path / "m"))
    assert [p.name for p in files.safetensors] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert sorted(stored_tensors(files)) == ["a", "b"]


def test_missing_shard_is_refused(tmp_path: Path):
    directory = sharded(tmp_path / "m")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="shard model-00002-of-00002.safetensors is missing"):
        find_weight_files(directory)


def test_missing_shard_without_index_is_refused(tmp_path: Path):
    directory = sharded(tmp_path / "m")
    (directory / "model.safetensors.index.json").unlink()
    (directory / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="shard model-00001-of-00002.safetensors is missing"):
        find_weight_files(directory)


def test_shard_lacking_a_tensor_the_index_names(tmp_path: Path):
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    directory = sharded(tmp_path / "m", {"a": first, "c": first, "b": second})
    with pytest.raises(UserError, match="lacks c, which the index says it holds"):
        find_weight_files(directory)


def test_index_pointing_at_a_pickle_needs_trust(tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    torch.save({"a": torch.zeros(2)}, directory / "pytorch_model.bin")
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model.bin"}})
    )
    with pytest.raises(UserError, match="points at pickled weights .pytorch_model.bin."):
        find_weight_files(directory)
    trusted = find_weight_files(directory, trust_pickle=True)
    assert [p.name for p in trusted.pickles] == ["pytorch_model.bin"] and not trusted.safetensors


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_only_pickles_need_trust(tmp_path: Path, name: str):
    torch.save({"a": torch.zeros(2)}, tmp_path / name)
    with pytest.raises(UserError, match=f"holds only pickled weights .{name}."):
        find_weight_files(tmp_path)
    assert [p.name for p in find_weight_files(tmp_path, trust_pickle=True).pickles] == [name]


def test_index_cannot_point_outside_the_directory(tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    save_file({"a": torch.zeros(2)}, tmp_path / "elsewhere.safetensors")
    weight_map = {"a": "../elsewhere.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="outside the checkpoint directory"):
        find_weight_files(directory)


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    save_file({"a": torch.zeros(2)}, directory / "one.safetensors")
    save_file({"a": torch.ones(2)}, directory / "two.safetensors")
    with pytest.raises(UserError, match="'a' is stored in more than one shard"):
        stored_tensors(find_weight_files(directory))
