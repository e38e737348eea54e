"""Shapes computed from config.json by rule must equal those of the model transformers builds."""

from __future__ import annotations

import pytest
import torch

from pruning.families import FAMILIES, adapter_for

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=100,
)


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY, **overrides})


CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("llama", {"head_dim": 32}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 16}),
    ("qwen3", {"attention_bias": True}),
    ("phi3", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    ("phi3", {"pad_token_id": 0, "num_key_value_heads": 4, "tie_word_embeddings": True}),
    ("gemma2", {"head_dim": 16}),
    ("gemma2", {"head_dim": 16, "attention_bias": True, "tie_word_embeddings": False}),
    ("gemma3_text", {"head_dim": 16}),
    ("gemma3_text", {"attention_bias": True}),
]


@pytest.mark.parametrize(("model_type", "overrides"), CASES)
def test_rule_shapes_equal_meta_build(model_type: str, overrides: dict):
    from transformers import AutoModelForCausalLM

    config = _config(model_type, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    built = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes_from_config(config.to_dict()) == built


def test_every_family_has_a_case():
    assert {model_type for model_type, _ in CASES} == set(FAMILIES.model_types())


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_family_defaults_fill_keys_config_json_omits(model_type: str):
    """A hand-written Gemma config without head_dim or tie_word_embeddings gets transformers' defaults."""
    config = _config(model_type).to_dict()
    sparse = {k: v for k, v in config.items() if k not in ("head_dim", "tie_word_embeddings")}
    assert config["head_dim"] == 256 and config["tie_word_embeddings"]
    assert shapes_from_config(sparse) == shapes_from_config(config)


SPARSE = {
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "vocab_size": 32064,  # above Phi-3's default pad_token_id
    "intermediate_size": 96,
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES.model_types()))
def test_keys_config_json_omits_take_transformers_defaults(model_type: str):
    """Only the sizes are given: head_dim, KV heads, biases and tying come from the family's defaults,
    which must be the ones transformers' config class fills in (Qwen3's head_dim is 128, not 256 / 8)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    sparse = {"model_type": model_type, **SPARSE}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type].from_dict(sparse))
    assert shapes_from_config(sparse) == {name: tuple(p.shape) for name, p in model.named_parameters()}


def shapes_from_config(config) -> dict[str, tuple[int, ...]]:
    """The adapter's shapes for a config dict (the rules under test)."""
    return adapter_for(config).parameter_shapes(config)
