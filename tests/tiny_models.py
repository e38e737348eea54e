"""Tiny random-weight models of every supported family, and plans that exercise every surgery path.

Weights are redrawn (std 0.1, norms around 1, biases non-zero) so that a bias or norm handled wrongly
changes the logits: the stock init leaves biases at zero and norms at one, which would hide such bugs.
"""

from __future__ import annotations

import random

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pruning.architectures import decoder_layers, head_dim_of, layer_geometry
from pruning.plan import LayerPlan, PruningPlan

ARCHS = ("llama_mha", "llama_gqa", "mistral", "qwen2", "qwen3")
TIED_ARCHS = ("llama_gqa", "qwen2", "qwen3")
NUM_LAYERS = 5
VOCAB = 128

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    num_hidden_layers=NUM_LAYERS,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(arch: str, attn_implementation: str) -> PreTrainedModel:
    if arch == "llama_mha":  # MHA with every optional bias (q/k/v/o and MLP)
        config = LlamaConfig(**_COMMON, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
        return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "llama_gqa":
        config = LlamaConfig(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "mistral":  # a short sliding window, so cached generation crosses it
        config = MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=8)
        return MistralForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "qwen2":  # q/k/v biases are built in
        config = Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
        return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "qwen3":  # per-head q_norm / k_norm
        config = Qwen3Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
        return Qwen3ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0) -> PreTrainedModel:
    """A seeded fp32 tiny model in eval mode."""
    torch.manual_seed(seed)
    model = _build(arch, attn_implementation)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1.0 + noise if "norm" in name else noise)
    return model.float().eval()


def make_plan(model: PreTrainedModel, seed: int = 0) -> PruningPlan:
    """A plan touching every path: layer 0 loses its attention (ZeroAttention at layer 0) and some
    channels; layer 1 some groups and channels; layer 2 everything (a zero layer); layer 3 some groups
    and its whole MLP; layer 4 nothing."""
    rng = random.Random(seed)
    head_dim = head_dim_of(model.config)
    plans = []
    for idx, layer in enumerate(decoder_layers(model)):
        geo = layer_geometry(layer, head_dim)
        groups, channels = range(geo.num_kv_heads), range(geo.intermediate_size)

        def some(pool: range) -> tuple[int, ...]:
            return tuple(rng.sample(list(pool), rng.randint(1, len(pool) - 1)))

        remove_groups = {0: tuple(groups), 1: some(groups), 2: tuple(groups), 3: some(groups)}.get(idx, ())
        remove_channels = {0: some(channels), 1: some(channels), 2: tuple(channels), 3: tuple(channels)}
        remove = remove_channels.get(idx, ())
        plans.append(LayerPlan(idx, geo.num_kv_heads, geo.intermediate_size, remove_groups, remove))
    return PruningPlan(layers=tuple(plans))


def input_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)
