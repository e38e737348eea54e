"""Timing prefill and decode in transformers (CPU or GPU) and llama.cpp (CPU, one engine per GGUF type):
models interleaved, medians of repetitions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from speed_flops import ModelShapes, decode_flops_per_token, model_shapes, prefill_flops_per_token

logger = logging.getLogger("speed")

DENSE = "dense"
TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"
ENGINES = (TRANSFORMERS, LLAMA_CPP)


def llama_cpp_engine(gguf_type: str | None) -> str:
    """The engine column of a GGUF set: ``llama.cpp f16``, or ``llama.cpp`` for the one unlabelled set."""
    return f"{LLAMA_CPP} {gguf_type}" if gguf_type else LLAMA_CPP


@dataclass
class Variant:
    """One model under test: its label, where it came from, the model, and what it costs."""

    label: str
    path: str
    model: Any
    params: int
    shapes: ModelShapes
    device: str = "cpu"


def load_variant(
    label: str,
    path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    device: str = "cpu",
) -> Variant:
    """A checkpoint directory (dense or pruned; ``load_pruned_model`` reads both) in eval mode, its
    weights read straight onto ``device``."""
    import torch

    from pruning.checkpoint.load import load_pruned_model

    model = load_pruned_model(
        path, dtype=getattr(torch, dtype), device=device, attn_implementation=attn_implementation
    )
    params = sum(p.numel() for p in model.parameters())
    return Variant(label, str(path), model.eval(), params, model_shapes(model), device)


def costs(variants: Sequence[Variant], prompt_len: int, new_tokens: int) -> list[dict[str, Any]]:
    """Per model: parameters and FLOPs per token, and the shares removed from the first (dense) one."""
    rows = []
    for v in variants:
        rows.append(
            {
                "model": v.label,
                "path": v.path,
                "params": v.params,
                "prefill_flops_per_token": prefill_flops_per_token(v.shapes, prompt_len),
                "decode_flops_per_token": decode_flops_per_token(v.shapes, prompt_len, new_tokens),
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("params", "prefill_flops_per_token", "decode_flops_per_token"):
            row[f"{key}_removed"] = 1 - row[key] / base[key]
    return rows


# -------------------------------------------------------------------------------------- transformers


def prompt_ids(vocab: int, batch: int, prompt_len: int, seed: int) -> Any:
    """Fixed random token ids, ``batch x prompt_len`` (smaller batches take the first rows)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen)


def _nothing() -> None:
    pass


def synchronizer(device: str) -> Callable[[], None]:
    """What makes the host wait for the work queued on ``device``: a GPU runs kernels after their launch
    returns, so a timed region ends when they finish, not when the host has queued them."""
    import torch

    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _nothing


def time_prefill(model: Any, ids: Any, sync: Callable[[], None] = _nothing) -> float:
    """Seconds of one forward over ``ids`` with the KV cache built and the last position's logits."""
    import torch

    mask = torch.ones_like(ids)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        sync()
        return time.perf_counter() - start


def time_generate(
    model: Any, ids: Any, new_tokens: int, sync: Callable[[], None] = _nothing
) -> dict[str, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, stamped at every step by a logits processor.

    ``decode_s``: first stamp (after the prompt's forward) to the last: ``new_tokens - 1`` decode steps.
    ``generate_prefill_s``: call to first stamp (generate's set-up and the prompt's forward). Each stamp
    waits for the step's logits (``sync``), so on a GPU a step is counted when its kernels have run.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            sync()
            self.stamps.append(time.perf_counter())
            return scores

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
    )
    clock = StepClock()
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([clock]),
        )
        sync()
        end = time.perf_counter()
    if tuple(out.shape) != (ids.shape[0], ids.shape[1] + new_tokens) or len(clock.stamps) != new_tokens:
        raise RuntimeError(
            f"generate made {tuple(out.shape)} with {len(clock.stamps)} steps; expected "
            f"{(ids.shape[0], ids.shape[1] + new_tokens)} with {new_tokens}"
        )
    return {
        "generate_s": end - start,
        "generate_prefill_s": clock.stamps[0] - start,
        "decode_s": clock.stamps[-1] - clock.stamps[0],
    }


def measure_transformers(variant: Variant, ids: Any, new_tokens: int) -> dict[str, Any]:
    """One repetition of one model at one batch size: a row of timings and tokens per second."""
    batch, prompt_len = ids.shape
    ids = ids.to(variant.device)  # before the clock: the prompt's copy to a GPU is no model's work
    sync = synchronizer(variant.device)
    prefill_s = time_prefill(variant.model, ids, sync)
    generated = time_generate(variant.model, ids, new_tokens, sync)
    return {
        "engine": TRANSFORMERS,
        "model": variant.label,
        "batch": int(batch),
        "prompt_len": int(prompt_len),
        "decode_steps": new_tokens - 1,
        "prefill_s": prefill_s,
        **generated,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / generated["decode_s"],
    }


# ------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None when ``llama_cpp`` cannot be imported."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def open_llama_cpp(path: str, prompt_len: int, new_tokens: int, threads: int) -> Any:
    """A llama-cpp-python model whose context holds the prompt and the new tokens, the prompt in one batch."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=prompt_len + new_tokens,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=prompt_len,
        logits_all=False,
        verbose=False,
    )


def measure_llama_cpp(
    label: str, llm: Any, prompt: Sequence[int], decode_ids: Sequence[int], engine: str = LLAMA_CPP
) -> dict[str, Any]:
    """One repetition in llama.cpp, batch 1: ``eval(prompt)`` after ``reset()``, then one ``eval`` per
    token of ``decode_ids`` (``new_tokens - 1`` fixed ids). ``engine`` names the GGUF set in the rows."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    prefilled = time.perf_counter()
    for token in decode_ids:
        llm.eval([token])
    end = time.perf_counter()
    prefill_s, decode_s = prefilled - start, end - prefilled
    return {
        "engine": engine,
        "model": label,
        "batch": 1,
        "prompt_len": len(prompt),
        "decode_steps": len(decode_ids),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": len(decode_ids) / decode_s,
    }


# --------------------------------------------------------------------------------------------- driver


def measure(
    variants: Sequence[Variant],
    *,
    batch_sizes: Sequence[int],
    prompt_len: int,
    new_tokens: int,
    runs: int,
    warmup: int = 1,
    seed: int = 0,
    llama: dict[str, dict[str, Any]] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``warmup + runs`` repetitions; in each, every batch size, and at each every model in turn in
    transformers, then each llama.cpp engine (``llama``: engine -> label -> opened model, batch 1) for
    every model it has. No ``batch_sizes``: transformers is not timed (the variants still give the
    vocabulary of the prompt). Returns every row, warm-up rows marked ``warmup: true``."""
    if new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode is timed from the first token to the last)")
    vocab = min(int(v.model.config.vocab_size) for v in variants)
    ids = prompt_ids(vocab, max(batch_sizes, default=1), prompt_len, seed)
    decode_ids = prompt_ids(vocab, 1, new_tokens - 1, seed + 1)[0].tolist()
    rows: list[dict[str, Any]] = []
    for rep in range(warmup + runs):
        is_warmup = rep < warmup
        for batch in batch_sizes:
            for variant in variants:
                row = measure_transformers(variant, ids[:batch], new_tokens)
                rows.append({"rep": rep - warmup, "warmup": is_warmup, **row})
                if on_row:
                    on_row(rows[-1])
        for engine, models in (llama or {}).items():
            for label, llm in models.items():
                row = measure_llama_cpp(label, llm, ids[0].tolist(), decode_ids, engine)
                rows.append({"rep": rep - warmup, "warmup": is_warmup, **row})
                if on_row:
                    on_row(rows[-1])
        kept = [r for r in rows if r["rep"] == rep - warmup]
        logger.info(
            "%s %d: %s",
            "warm-up" if is_warmup else "repetition",
            (rep if is_warmup else rep - warmup) + 1,
            "; ".join(
                f"{r['engine']} b{r['batch']} {r['model']} {r['prefill_tok_s']:,.0f}/{r['decode_tok_s']:,.1f}"
                for r in kept
            ),
        )
    return rows
