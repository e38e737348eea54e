"""Loading the source model: read (not mapped) into the placement the config asks for."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from pruning.config import ModelConfig
from pruning.errors import UserError
from pruning.source.loading import load_model_and_tokenizer
from tests.tiny_pipeline import build_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _load(path: Path, **model: object):
    config = ModelConfig(path=str(path), **{"dtype": "float32", "device_map": "cpu", **model})
    return load_model_and_tokenizer(config, str(path))


def test_the_read_model_equals_what_from_pretrained_gives(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    loaded = _load(tiny_dir).model
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])  # batch 3
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert loaded.generation_config.to_dict() == reference.generation_config.to_dict()
    assert loaded.config._name_or_path == str(tiny_dir) and not loaded.training


def test_a_broken_generation_config_is_a_warning_as_in_from_pretrained(tiny_dir, tmp_path, caplog):
    model = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    (model / "generation_config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        loaded = _load(model).model
    assert "generation_config.json cannot be read" in caplog.text
    assert loaded.generation_config is not None


@pytest.mark.parametrize(
    "model", [{"streaming": "always"}, {"device_map": {"": "disk"}}], ids=["always", "map"]
)
def test_trusted_pickles_cannot_be_streamed_or_placed(tiny_dir: Path, tmp_path: Path, model: dict):
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(
        UserError, match="placing or streaming parts reads safetensors; .* has pickled weights"
    ):
        _load(pickled, trust_pickle=True, **model)
