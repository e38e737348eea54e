"""Torch-Pruning's own ``BasePruner`` configured as its ``examples/LLMs/prune_llm.py`` (v1.6.1) does."""

from __future__ import annotations

import copy
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from pruning.families import adapter_for

from .common import Notes, count_params, method_notes
from .deadline import deadline, error_text

logger = logging.getLogger(__name__)


def _example_pruner(tp: Any, model: nn.Module, example_inputs: torch.Tensor, ratio: float) -> Any:
    """``examples/LLMs/prune_llm.py``'s pruner, as written there (v1.6.1): magnitude importance, local
    (per-layer) ratio for the width and for whole heads, lm_head ignored, channels rounded to 4."""
    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    return tp.pruner.BasePruner(
        model,
        example_inputs=example_inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        output_transform=lambda x: x.logits,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        out_channel_groups={},
        round_to=4,
    )


def _prune_with(
    tp: Any, model: nn.Module, example_inputs: torch.Tensor, ratio: float, timeout_s: float
) -> None:
    with deadline(timeout_s):
        pruner = _example_pruner(tp, model, example_inputs, ratio)
        for group in pruner.step(interactive=True):
            group.prune()


def _twin(model: nn.Module, attn_implementation: str) -> nn.Module:
    """A one-layer copy of the model's architecture with a small vocabulary and random weights: the
    example's per-layer (local) pruning removes the same counts from it, in a fraction of the time."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    config.vocab_size = 256
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 256:
            setattr(config, key, None)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    config.use_cache = False
    torch.manual_seed(0)
    twin = type(model)._from_config(config, attn_implementation=attn_implementation)
    return twin.float().eval()


def _predicted_params(twin: nn.Module, num_layers: int, vocab: int, tied: bool) -> int:
    """The real model's size after the pruning the twin received: its layer's parameters per layer,
    embedding (and an untied head) at the real vocabulary, the final norm."""
    width = twin.get_input_embeddings().weight.shape[1]
    layer = sum(p.numel() for p in adapter_for(twin.config).decoder_layers(twin)[0].parameters())
    norm = sum(p.numel() for n, p in twin.named_parameters() if n.startswith("model.norm"))
    return num_layers * layer + vocab * width * (1 if tied else 2) + norm


def _fix_after_pruning(model: nn.Module, tied: bool) -> list[str]:
    """The example's attribute and config updates, plus what this transformers needs; returns each
    adjustment beyond the example's."""
    needed = []
    config = model.config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and head.weight is not embed.weight:
        if head.weight.shape == embed.weight.shape and torch.equal(head.weight, embed.weight):
            extra = head.weight.numel()
            head.weight = embed.weight
            needed.append(
                f"re-tied lm_head to embed_tokens: torch-pruning pruned the shared weight's two uses with "
                f"the same columns but left two tensors (+{extra:,} parameters untied)"
            )
        else:
            needed.append("lm_head and embed_tokens came out different: left untied and counted twice")
    config.hidden_size = head.in_features  # the example's updates from here on
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            config.num_attention_heads = heads
            config.num_key_value_heads = kv_heads
            module.num_key_value_groups = heads // kv_heads
            if heads % kv_heads:
                needed.append(f"{name}: {heads} query heads do not split over {kv_heads} KV heads")
        elif name.endswith("mlp") and hasattr(module, "gate_proj"):
            config.intermediate_size = module.gate_proj.out_features
    return needed


def torch_pruning(
    model: nn.Module, windows: torch.LongTensor, ratio: float, batch_size: int, timeout_s: float = 900.0
) -> Notes:
    """Torch-Pruning (Fang et al., "DepGraph", CVPR 2023; github.com/VainF/Torch-Pruning) pruning the
    model itself, configured as its ``examples/LLMs/prune_llm.py``: it narrows the hidden size (the
    residual stream, embeddings included), the MLP channels and whole query heads by one local ratio,
    ranked by group L2 magnitude. ``pruning_ratio`` is a width ratio, so it is searched on a one-layer
    twin (``_twin``) until the real model's predicted size loses ~``ratio`` of all parameters; the real
    share is counted after pruning. Tracing runs on the first 8 tokens of the first window (the example
    uses "Hello world."; magnitude needs no data).

    Every adjustment beyond the example's is listed in ``notes["needed"]``; a failure ends the method
    with ``notes["failed"]`` naming the step and the error, and the model is then unusable.
    """
    before = count_params(model)
    notes: Notes = {"method": "torch_pruning", "ratio": ratio, "params_before": before, "needed": []}
    needed: list[str] = notes["needed"]
    try:
        import torch_pruning as tp  # noqa: PLC0415 - optional: the row says so when it is missing
    except ImportError as exc:
        notes["failed"] = f"import torch_pruning: {exc}"
        return notes
    try:
        notes["torch_pruning_version"] = version("torch-pruning")
    except PackageNotFoundError:
        notes["torch_pruning_version"] = "unknown"
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    num_layers, vocab = config.num_hidden_layers, config.vocab_size
    example = windows[:1, :8].to(model.get_input_embeddings().weight.device)
    twin_example = torch.arange(3, 11).unsqueeze(0)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    config.use_cache = False
    needed.append("model.config.use_cache = False before tracing")

    try:  # 1. the example as it is, with the attention the model was loaded with
        _prune_with(tp, _twin(model, impl), twin_example, ratio, timeout_s)
    except Exception as exc:  # any failure is the finding this row reports
        if impl == "eager":
            notes["failed"] = f"pruner.step on the model's architecture ({impl} attention): {error_text(exc)}"
            return notes
        needed.append(f"eager attention: with {impl} attention pruner.step fails: {error_text(exc)}")
        impl = "eager"
        try:
            model.set_attn_implementation("eager")
        except Exception as exc2:  # noqa: BLE001 - reported
            notes["failed"] = f"switching to eager attention: {error_text(exc2)}"
            return notes

    start = time.perf_counter()  # 2. the width ratio that removes ~ratio of all parameters
    tried = []
    lo, hi = 0.0, 0.95
    try:
        for _ in range(12):
            mid = (lo + hi) / 2
            twin = _twin(model, impl)
            _prune_with(tp, twin, twin_example, mid, timeout_s)
            share = 1 - _predicted_params(twin, num_layers, vocab, tied) / before
            tried.append((abs(share - ratio), mid, share))
            lo, hi = (mid, hi) if share < ratio else (lo, mid)
    except Exception as exc:  # noqa: BLE001 - reported
        notes["failed"] = f"ratio search on a one-layer twin: {error_text(exc)}"
        return notes
    _, width_ratio, predicted = min(tried)
    notes.update(
        pruning_ratio=round(width_ratio, 5),
        predicted_share=round(predicted, 5),
        ratio_search_s=round(time.perf_counter() - start, 2),
    )

    with deadline(timeout_s):  # 3. the real model
        try:
            pruner = _example_pruner(tp, model, example, width_ratio)
        except Exception as exc:  # noqa: BLE001 - reported
            notes["failed"] = f"building the dependency graph (BasePruner.__init__): {error_text(exc)}"
            return notes
        try:
            for group in pruner.step(interactive=True):
                group.prune()
        except Exception as exc:  # noqa: BLE001 - reported
            notes["failed"] = f"pruner.step / group.prune: {error_text(exc)}"
            return notes
        finally:
            del pruner
    needed.extend(_fix_after_pruning(model, tied))
    layer = adapter_for(config).decoder_layers(model)[0]
    attn = layer.self_attn
    notes["shapes"] = (
        f"hidden {config.hidden_size}, query heads {attn.q_proj.out_features // attn.head_dim}, KV heads "
        f"{attn.k_proj.out_features // attn.head_dim}, intermediate {layer.mlp.gate_proj.out_features} "
        "(every layer)"
    )
    try:  # 4. it must run
        with torch.no_grad():
            model.eval()(input_ids=example, use_cache=False)
    except Exception as exc:  # noqa: BLE001 - reported
        notes["failed"] = f"forward after pruning: {error_text(exc)}"
        return notes
    return {**notes, **method_notes("torch_pruning", model, before, ratio, None)}
