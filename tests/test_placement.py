"""model.device_map / model.streaming -> where each part lives; bad maps fail in one line."""

from __future__ import annotations

import pytest

from pruning.config import ModelConfig
from pruning.errors import UserError
from pruning.source import placement as placement_module
from pruning.source.placement import DISK, part_names, resolve_placement, weight_bytes
from pruning.source.streaming import build_skeleton
from tests.tiny_models import tiny_model

LAYERS = [f"model.layers.{i}" for i in range(5)]


def _skeleton(arch: str = "llama_mha"):
    import torch

    return build_skeleton(tiny_model(arch).config, torch.float32)


def _resolve(**model_config):
    return resolve_placement(ModelConfig(path="x", **model_config), _skeleton())


def test_parts_are_the_layers_and_the_modules_outside_them() -> None:
    assert part_names(_skeleton("llama_mha")) == ["model.embed_tokens", *LAYERS, "model.norm", "lm_head"]
    # a tied head shares the embeddings' parameter, so it is no part of its own
    assert part_names(_skeleton("llama_gqa")) == ["model.embed_tokens", *LAYERS, "model.norm"]


def test_a_single_device_holds_everything_when_it_fits() -> None:
    placement = _resolve(device_map="cpu")
    assert set(placement.parts.values()) == {"cpu"} and not placement.streamed
    assert placement.compute == "cpu"


def test_auto_streaming_when_the_weights_exceed_the_room(monkeypatch: pytest.MonkeyPatch) -> None:
    skeleton = _skeleton()
    monkeypatch.setattr(placement_module, "_room", lambda device: weight_bytes(skeleton) - 1)
    placement = resolve_placement(ModelConfig(path="x"), skeleton)
    assert set(placement.parts.values()) == {DISK} and placement.compute == "cpu"
    assert "exceed the" in placement.reason and "room on cpu, so every layer is streamed" in placement.reason
    assert not resolve_placement(ModelConfig(path="x", streaming="never"), skeleton).streamed
    with pytest.raises(UserError, match="streaming is never, but model.device_map puts model.layers.1"):
        device_map = {"": "cpu", "model.layers.1": DISK}
        resolve_placement(ModelConfig(path="x", streaming="never", device_map=device_map), skeleton)
    monkeypatch.setattr(placement_module, "_room", lambda device: weight_bytes(skeleton))
    assert not resolve_placement(ModelConfig(path="x"), skeleton).streamed


def test_streaming_always_streams_every_part() -> None:
    placement = _resolve(streaming="always")
    assert set(placement.parts.values()) == {DISK} and placement.streamed


def test_auto_without_a_gpu_is_the_cpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto is accelerate's map (tests/test_gpu.py)")
    assert set(_resolve(device_map="auto").parts.values()) == {"cpu"}


def test_an_explicit_map_is_matched_by_longest_prefix() -> None:
    device_map = {"": "cpu", "model.layers": DISK, "model.layers.1": "cpu", "lm_head": DISK}
    parts = _resolve(device_map=device_map).parts
    assert parts == {
        "model.embed_tokens": "cpu",
        "model.layers.0": DISK,
        "model.layers.1": "cpu",
        "model.layers.2": DISK,
        "model.layers.3": DISK,
        "model.layers.4": DISK,
        "model.norm": "cpu",
        "lm_head": DISK,
    }


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"model.layers.1.mlp": DISK, "": "cpu"}, "model.layers.1.mlp is inside model.layers.1"),
        ({"model.decoder": "cpu", "": "cpu"}, "no module 'model.decoder'"),
        ({"model": "cpu"}, "places nothing for lm_head"),
        ({"": "cuda:0"}, "no CUDA device"),
        ({"": 0}, "no CUDA device"),
    ],
)
def test_a_bad_map_is_one_line(device_map: dict, message: str) -> None:
    import torch

    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match=message):
        _resolve(device_map=device_map)
