"""Releasing the file pages of replaced weights frees memory and never changes a value."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning.storage import file_pages
from pruning.surgery import apply_plan
from tests.tiny_models import input_ids, make_plan, tiny_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path: Path) -> None:
    original = {"big": torch.randn(2_000_000), "small": torch.randn(10)}
    save_file(original, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")  # mapped, not copied
    assert torch.equal(loaded["big"], original["big"])  # every page now resident
    before = _rss_file_kb()
    released = file_pages.release(loaded["big"])
    assert released >= 7_900_000  # all but the partial pages at either end of 8 MB
    assert _rss_file_kb() <= before - released // 2048  # at least half of it left, in kB
    assert torch.equal(loaded["big"], original["big"])  # read back from the file
    assert torch.equal(loaded["small"], original["small"])  # a neighbour's pages are not touched


def test_pages_written_since_loading_are_never_released(tmp_path: Path) -> None:
    """A weight changed in place (a hook scaled it) keeps its values: nothing of it is given back."""
    save_file({"big": torch.randn(2_000_000), "next": torch.randn(3000)}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    loaded["big"].mul_(2.0)
    doubled = loaded["big"].clone()
    assert file_pages.release(loaded["big"]) == 0
    assert torch.equal(loaded["big"], doubled)
    # a neighbour written in place keeps its values whatever happens to the tensor beside it
    fresh = load_file(tmp_path / "w.safetensors")
    fresh["next"].add_(1.0)
    changed = fresh["next"].clone()
    file_pages.release(fresh["big"])
    assert torch.equal(fresh["next"], changed)


def test_memory_that_is_not_a_mapped_file_is_never_released() -> None:
    tensor = torch.randn(2_000_000)
    kept = tensor.clone()
    assert file_pages.release(tensor) == 0
    assert torch.equal(tensor, kept)


def test_pruning_a_mapped_model_equals_pruning_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Surgery releases the pages of every replaced weight of a model transformers mapped from disk."""
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path / "m")
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    in_memory = copy.deepcopy(mapped)  # anonymous memory
    ranges = file_pages.safetensors_mappings()
    weight = mapped.model.layers[1].mlp.up_proj.weight
    assert any(low <= weight.data_ptr() < high for low, high in ranges)  # the premise: it is mapped
    plan = make_plan(mapped)
    released: list[int] = []
    release = file_pages.release
    monkeypatch.setattr(
        file_pages, "release", lambda t, m=None: released.append(release(t, m)) or released[-1]
    )
    apply_plan(mapped, plan)
    assert sum(released) > 0  # the replaced weights' pages went back
    released.clear()
    apply_plan(in_memory, plan)
    assert released and sum(released) == 0  # nothing of the anonymous copy
    ids = input_ids(batch=3)
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, in_memory(ids).logits)
