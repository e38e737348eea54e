"""Shapes computed from config.json by rule must equal those of the model transformers builds."""

from __future__ import annotations

import pytest
import torch

from pruning.analysis.shape_rules import FAMILIES, shapes_from_config

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
    assert {model_type for model_type, _ in CASES} == set(FAMILIES)
