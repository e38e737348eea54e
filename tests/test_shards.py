"""Tensor-by-tensor safetensors reading and writing: what transformers and safetensors read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning.errors import UserError
from pruning.storage.shards import INDEX_FILE, SINGLE_FILE, ShardReader, ShardWriter
from pruning.storage.weight_files import find_weight_files


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 6, generator=gen),  # 96 bytes
        "b.weight": torch.randn(10, generator=gen).to(torch.bfloat16),  # 20 bytes
        "c.weight": torch.randn(3, 3, 3, generator=gen).half(),  # 54 bytes
        "d.empty": torch.empty(0, 5),
        "e.ids": torch.arange(7),
    }


def _declared(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _read_back(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in find_weight_files(directory).safetensors:
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("max_bytes", [10**6, 100, 1])
def test_tensors_written_in_any_order_read_back_equal(tmp_path: Path, max_bytes: int) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, _declared(tensors), max_bytes)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    back = _read_back(tmp_path)
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in tensors.items())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_bytes == 10**6:
        assert files == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
    else:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shards_fill_in_declaration_order_and_a_big_tensor_gets_its_own(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, _declared(tensors), 100)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    # a (96) alone: adding b (20) would pass 100; b + c = 74; d (0) joins them; e (56) would pass 100
    assert weight_map == {
        "a.weight": "model-00001-of-00003.safetensors",
        "b.weight": "model-00002-of-00003.safetensors",
        "c.weight": "model-00002-of-00003.safetensors",
        "d.empty": "model-00002-of-00003.safetensors",
        "e.ids": "model-00003-of-00003.safetensors",
    }


def test_a_wrong_write_is_refused_and_a_missing_one_fails_close(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, _declared(tensors), 10**6)
    with pytest.raises(RuntimeError, match="not declared"):
        writer.write("z.weight", torch.zeros(1))
    with pytest.raises(RuntimeError, match="declared torch.float32"):
        writer.write("a.weight", torch.zeros(4, 5))
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_reader_reads_each_tensor_and_casts_floating_ones(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(dict(list(tensors.items())[:2]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(tensors.items())[2:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(tensors)}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = ShardReader(find_weight_files(tmp_path))
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor)
    cast = reader.read("a.weight", torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, tensors["a.weight"].to(torch.bfloat16))
    assert reader.read("e.ids", torch.bfloat16).dtype == torch.int64  # integers are never cast
    with pytest.raises(UserError, match="no tensor z"):
        reader.read("z")


def test_wider_elements_come_first_so_every_tensor_is_aligned(tmp_path: Path) -> None:
    tensors = {"half": torch.ones(3).half(), "float": torch.ones(5), "long": torch.arange(2)}
    writer = ShardWriter(tmp_path, _declared(tensors), 10**6)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    for name, tensor in tensors.items():
        assert writer.slots[name].offset % tensor.element_size() == 0, name
    assert all(torch.equal(_read_back(tmp_path)[n], t) for n, t in tensors.items())


def test_a_failed_write_leaves_no_descriptor_open(tmp_path: Path) -> None:
    import os

    before = len(os.listdir("/proc/self/fd"))
    tensors = _tensors()
    writer = ShardWriter(tmp_path, _declared(tensors), 100)  # three shards, three descriptors
    assert len(os.listdir("/proc/self/fd")) == before + 3
    with pytest.raises(RuntimeError):
        writer.write("a.weight", torch.zeros(1))
    writer.abort()
    writer.abort()  # twice is harmless
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("change", ["deleted", "replaced-by-a-directory"])
def test_a_shard_removed_mid_run_is_one_line(tmp_path: Path, change: str) -> None:
    """Finding 7: a streamed run whose shard was deleted or replaced by a directory raised a traceback."""
    save_file(_tensors(), tmp_path / SINGLE_FILE)
    reader = ShardReader(find_weight_files(tmp_path))  # the header is checked here, at the start
    (tmp_path / SINGLE_FILE).unlink()
    if change == "replaced-by-a-directory":
        (tmp_path / SINGLE_FILE).mkdir()
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read a\.weight \(.*\); was it removed"):
        reader.read("a.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_source_weights_that_are_not_finite_are_named(tmp_path: Path, bad: float) -> None:
    """Finding 7: NaN or Inf in the source reached the planner, whose message blamed low precision."""
    tensors = _tensors()
    tensors["a.weight"][2, 3] = bad
    save_file(tensors, tmp_path / SINGLE_FILE)
    reader = ShardReader(find_weight_files(tmp_path))
    with pytest.raises(
        UserError, match=r"a\.weight holds NaN or infinite values; the source weights are broken"
    ):
        reader.read("a.weight", torch.float32)
    assert torch.equal(reader.read("b.weight"), tensors["b.weight"])  # the others read as before


def test_a_value_beyond_the_run_dtype_is_named_with_the_fix(tmp_path: Path) -> None:
    tensors = _tensors()
    tensors["a.weight"][0, 0] = 1e6  # finite in float32, beyond float16's 65504
    save_file(tensors, tmp_path / SINGLE_FILE)
    reader = ShardReader(find_weight_files(tmp_path))
    with pytest.raises(
        UserError, match=r"a\.weight holds values beyond the range of float16; choose a wider"
    ):
        reader.read("a.weight", torch.float16)
    assert torch.isfinite(reader.read("a.weight", torch.bfloat16)).all()  # within bfloat16 range: no error


def test_float8_and_unsigned_sources_are_read_as_from_pretrained_reads_them(tmp_path: Path) -> None:
    """The header check accepts them, so the reader must too (it refused them as "cannot be streamed")."""
    tensors = {
        "f8.weight": torch.tensor([[0.5, -1.0], [2.0, 0.25]]).to(torch.float8_e4m3fn),
        "u16.ids": torch.tensor([1, 65535], dtype=torch.uint16),
    }
    save_file(tensors, tmp_path / SINGLE_FILE)
    reader = ShardReader(find_weight_files(tmp_path))
    assert torch.equal(reader.read("f8.weight", torch.bfloat16), tensors["f8.weight"].to(torch.bfloat16))
    assert torch.equal(reader.read("u16.ids", torch.bfloat16), tensors["u16.ids"])  # integers keep theirs
    broken = tensors["f8.weight"].clone()
    broken[0, 0] = float("nan")
    save_file({"f8.weight": broken}, tmp_path / SINGLE_FILE)
    with pytest.raises(UserError, match="holds NaN or infinite values"):
        ShardReader(find_weight_files(tmp_path)).read("f8.weight", torch.bfloat16)


def test_every_safetensors_dtype_is_either_read_or_refused_before_loading() -> None:
    from pruning.storage.shards import TORCH_DTYPES
    from pruning.storage.weight_files import DTYPE_BITS, NO_TORCH_DTYPE

    readable = set(TORCH_DTYPES) | {"F8_E8M0"}  # F8_E8M0: in torch builds that have float8_e8m0fnu
    assert set(DTYPE_BITS) == readable | set(NO_TORCH_DTYPE) and not readable & set(NO_TORCH_DTYPE)
    for name, dtype in TORCH_DTYPES.items():  # the widths agree, so a byte-range check is a shape check
        assert DTYPE_BITS[name] == dtype.itemsize * 8
