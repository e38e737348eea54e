"""Shared fixtures: config directories of real models, a hand-pruned tiny model, the real SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"
GOLDEN = FIXTURES / "golden"
REPO = Path(__file__).parent.parent


def config_dir(name: str) -> Path:
    return CONFIGS / name


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=128,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_hand_pruned(config=None) -> nn.Module:
    """A tiny GQA model pruned by hand, without the surgery module (so analysis is tested on its own).

    Layer 0 keeps 1 of 2 KV groups and 100 of 128 channels; layer 1 lost its attention (and the
    input norm that fed it); layer 2 lost everything (a zero layer); layer 3 is untouched.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config or tiny_llama_config()).eval()
    layers = model.model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    attn.q_proj, attn.k_proj, attn.v_proj = (
        nn.Linear(64, 32, False),
        nn.Linear(64, 16, False),
        nn.Linear(64, 16, False),
    )
    attn.o_proj = nn.Linear(32, 64, False)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        nn.Linear(64, 100, False),
        nn.Linear(64, 100, False),
        nn.Linear(100, 64, False),
    )
    layers[1].self_attn, layers[1].input_layernorm = ZeroAttention(1, 16), nn.Identity()
    layers[2].self_attn, layers[2].input_layernorm = ZeroAttention(2, 16), nn.Identity()
    layers[2].mlp, layers[2].post_attention_layernorm = ZeroMLP(), nn.Identity()
    return model


HAND_PRUNED_LAYOUT = {
    "version": 1,
    "num_attention_heads": [2, 0, 0, 4],
    "num_key_value_heads": [1, 0, 0, 2],
    "intermediate_size": [100, 128, 0, 128],
}


def save_with_layout(model: nn.Module, directory: Path) -> Path:
    """save_pretrained plus the per-layer layout in config.json (what the pipeline's checkpoint writes)."""
    model.save_pretrained(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["pruning_layout"] = HAND_PRUNED_LAYOUT
    config_file.write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture
def hand_pruned() -> nn.Module:
    return build_hand_pruned()


@pytest.fixture
def hand_pruned_dir(tmp_path: Path, hand_pruned: nn.Module) -> Path:
    return save_with_layout(hand_pruned, tmp_path / "pruned")


@pytest.fixture
def config_only_copy(tmp_path: Path):
    """Copy a checkpoint's config.json alone into a fresh directory."""

    def copy(src: Path) -> Path:
        dst = tmp_path / f"config-only-{src.name}"
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        return dst

    return copy


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M as a safetensors directory (downloaded and converted once per machine)."""
    from pruning.source.builtin import resolve

    return Path(resolve("smollm2-135m"))
