"""GPU paths: a device map with a GPU in it, streaming onto a GPU, accelerate's auto map. Skipped where
no CUDA device is visible (CI has none); run on a lent GPU machine (docs/memory.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pruning
from pruning.planning.plan import PruningPlan
from tests.oracle import zero_plan_structures
from tests.test_pipeline import _saved_tensors, prune
from tests.tiny_pipeline import VOCAB, build_tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-gpu") / "model")


def _oracle(result, tiny_dir: Path) -> None:
    """The saved model equals the dense model with the plan's structures zeroed (on the CPU)."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    pruned = pruning.load_pruned_model(result.out / "models")
    zero_plan_structures(dense, PruningPlan.from_dict(result.plan))
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_onto_the_gpu_equals_the_model_on_the_gpu(tmp_path: Path, tiny_dir: Path, dtype: str):
    on_gpu = prune(tmp_path, tiny_dir, "gpu", model={"device_map": "cuda", "dtype": dtype})
    streamed = prune(
        tmp_path, tiny_dir, "streamed", model={"device_map": "cuda", "dtype": dtype, "streaming": "always"}
    )
    assert on_gpu.code == streamed.code == 0 and on_gpu.plan == streamed.plan
    assert streamed.record["placement"]["streamed"] and on_gpu.record["peak_gpu_mb"] > 0
    a, b = _saved_tensors(on_gpu.out), _saved_tensors(streamed.out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_map_over_gpu_cpu_and_disk_prunes_correctly(tmp_path: Path, tiny_dir: Path):
    device_map = {"": "cuda:0", "model.layers.1": "cpu", "model.layers.3": "disk"}
    result = prune(tmp_path, tiny_dir, model={"device_map": device_map})
    assert result.code == 0
    assert result.record["placement"]["parts"]["model.layers.3"] == "disk"
    _oracle(result, tiny_dir)


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_a_gpu_and_cpu_map_runs_whole_model_forwards_and_backwards(
    tmp_path: Path, tiny_dir: Path, importance: str
):
    """No disk: accelerate's hooks carry activations between devices (whole_model engine, taylor)."""
    result = prune(
        tmp_path,
        tiny_dir,
        model={"device_map": {"": 0, "model.layers.2": "cpu", "lm_head": "cpu"}},
        calibration={"engine": "whole_model"},
        pruning={"ratio": 0.2, "importance": importance},
    )
    assert result.code == 0 and not result.record["placement"]["streamed"]
    _oracle(result, tiny_dir)


def test_auto_puts_a_small_model_on_the_gpu(tmp_path: Path, tiny_dir: Path):
    result = prune(tmp_path, tiny_dir, model={"device_map": "auto"})
    assert result.code == 0
    assert set(result.record["placement"]["parts"].values()) == {"cuda:0"}
    assert json.loads((result.out / "plan.json").read_text()) == result.plan
    _oracle(result, tiny_dir)


def test_a_pruned_checkpoint_loads_with_an_auto_map_onto_the_gpu(tmp_path: Path, tiny_dir: Path):
    result = prune(tmp_path, tiny_dir)
    on_cpu = pruning.load_pruned_model(result.out / "models")
    on_gpu = pruning.load_pruned_model(result.out / "models", device_map="auto")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids.cuda()).logits.cpu(), on_cpu(ids).logits, atol=1e-4, rtol=1e-4)
