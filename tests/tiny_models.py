"""Tiny random-weight models of every supported family, and plans that exercise every surgery path.

Weights are redrawn (std 0.1, norms around 1, biases non-zero) so that a bias or norm handled wrongly
changes the logits: the stock init leaves biases at zero and norms at one, which would hide such bugs.
"""

from __future__ import annotations

import random

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pruning.families import adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_plan

ARCHS = ("llama_mha", "llama_gqa", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
TIED_ARCHS = ("llama_gqa", "qwen2", "qwen3", "gemma2", "gemma3")
# Attention implementations each family offers on CPU: transformers has no sdpa path for Gemma 2 (its
# logit soft-capping), so Gemma 2 is proven with eager only.
ARCH_IMPLS = tuple(
    (arch, impl) for arch in ARCHS for impl in ("eager", "sdpa") if not (arch == "gemma2" and impl == "sdpa")
)
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


def _build(arch: str, attn_implementation: str, **overrides: object) -> PreTrainedModel:
    common = {**_COMMON, **overrides}
    if arch == "llama_mha":  # MHA with every optional bias (q/k/v/o and MLP)
        config = LlamaConfig(**common, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
        return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "llama_gqa":
        config = LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "mistral":  # a short sliding window, so cached generation crosses it
        config = MistralConfig(**common, num_key_value_heads=2, sliding_window=8)
        return MistralForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "qwen2":  # q/k/v biases are built in
        config = Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
        return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "qwen3":  # per-head q_norm / k_norm
        config = Qwen3Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
        return Qwen3ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj; a sliding window cached generation crosses
        config = Phi3Config(**common, num_key_value_heads=2, sliding_window=8)
        return Phi3ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "gemma2":  # sandwich norms, (1 + w) norm scale, logit soft-capping, alternating windows
        config = Gemma2Config(**common, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=16)
        return Gemma2ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    if arch == "gemma3":  # Gemma 2's norms plus per-head q/k norms; sliding layers with their own rotary base
        config = Gemma3TextConfig(
            **common,
            num_key_value_heads=2,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
        )
        return Gemma3ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_model(
    arch: str, attn_implementation: str = "eager", seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """A seeded fp32 tiny model in eval mode (``overrides`` change config values, e.g. vocab_size)."""
    torch.manual_seed(seed)
    model = _build(arch, attn_implementation, **overrides)
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
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    plans = []
    for idx, layer in enumerate(adapter.decoder_layers(model)):
        geo = adapter.geometry(layer, head_dim)
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


def uniformly_pruned(arch: str = "llama_gqa", groups: int = 1, **overrides: object) -> PreTrainedModel:
    """Every layer loses its first ``groups`` KV groups and every third MLP channel: the same sizes
    everywhere, so the checkpoint takes the stock format."""
    model = tiny_model(arch, **overrides)
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    geometries = [adapter.geometry(layer, head_dim) for layer in adapter.decoder_layers(model)]
    plan = PruningPlan(
        layers=tuple(
            LayerPlan(
                i,
                geo.num_kv_heads,
                geo.intermediate_size,
                tuple(range(groups)),
                tuple(range(0, geo.intermediate_size, 3)),
            )
            for i, geo in enumerate(geometries)
        )
    )
    apply_plan(model, plan)
    return model
