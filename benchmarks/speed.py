"""Prefill and decode tokens per second of the dense and the pruned SmolLM2-135M on the CPU.

    python benchmarks/speed.py --pruned results/smollm2_0.2/models [--pruned DIR --label NAME ...]
        [--dense smollm2-135m] [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 64] [--runs 5]
        [--warmup 1] [--threads N] [--dtype float32] [--seed 0]
        [--gguf-dense FILE --gguf-pruned FILE ...] [--out benchmarks/results/speed.md]

Every model is loaded once (``--dense``: a built-in name, resolved as the pipeline resolves it, or a
checkpoint directory; ``--pruned``: checkpoint directories the pipeline wrote, loaded with
``load_pruned_model``), then each repetition measures all of them in turn (dense, pruned, dense, pruned,
...: interleaved, so that drift of the machine affects every model alike), after ``--warmup``
repetitions that are recorded but not counted. Cells are the median of ``--runs`` repetitions, with the
minimum and maximum; ``x dense`` is the pruned median over the dense median.

transformers, for each batch size: the prompt is ``batch x prompt_len`` fixed random token ids (seeded;
no tokenizer). Prefill: one forward over the prompt with ``use_cache=True`` and the logits of the last
position only (``logits_to_keep=1``, as ``generate`` computes them). Decode: greedy ``generate`` of
exactly ``new_tokens`` tokens (``min_new_tokens = max_new_tokens``, ``use_cache=True``), timed inside
``generate`` by a logits processor that stamps each step: from the first step (the prompt's forward,
which yields the first token) to the last, ``new_tokens - 1`` forward passes of one token per sequence
with the KV cache, generate's per-step work (argmax, stopping checks) included; decode tok/s =
``batch x (new_tokens - 1)`` over that time.

llama.cpp (when ``llama_cpp``, i.e. llama-cpp-python, is importable and GGUF files are given; batch 1):
prefill is ``llm.eval(prompt)`` after ``llm.reset()`` (the same token ids, ``n_batch = prompt_len``, so
one batch, logits of the last token only); decode is ``new_tokens - 1`` calls of ``llm.eval([token])``
fed fixed random token ids (which tokens are fed does not change the work; llama-cpp-python keeps no
logits with ``logits_all=False`` to take an argmax from).

Next to the speeds: the share of parameters removed and the FLOPs per token of prefill and decode
(``forward_flops``: every linear layer's multiply-adds from its weight shape, plus the attention scores
and weighted values of the query heads each layer kept), and their ratio dense / pruned: the speed-up
that a time proportional to FLOPs would give.

Writes ``--out`` (markdown: machine, versions, protocol, tables), ``.jsonl`` beside it (every timing of
every repetition, warm-up included) and ``.meta.json`` (versions, threads, CPU, arguments, costs,
summary). Numbers from a busy machine are noise: measure on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger("speed")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed.md"
DENSE = "dense"
TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"


# ------------------------------------------------------------------------------------------------ FLOPs


@dataclass(frozen=True)
class ModelShapes:
    """What the FLOPs count needs, read from a model's weights (``model_shapes``).

    ``linear_macs``: multiply-adds per token of every linear layer but the output head (sum of
    ``in_features x out_features``); ``head_macs``: those of the output head (``hidden x vocab``);
    ``attention_widths``: per decoder layer, query heads kept x head_dim (0 where attention is removed).
    """

    linear_macs: int
    head_macs: int
    attention_widths: tuple[int, ...]


def forward_flops(shapes: ModelShapes, new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1) -> int:
    """FLOPs of one forward of one sequence over ``new_tokens`` tokens after ``past_tokens`` cached ones,
    with logits for ``logits_tokens`` positions; one multiply-add is 2 FLOPs.

    - Linear layers: each token goes through every linear layer of the decoder once, ``in x out``
      multiply-adds each (q/k/v/o, gate/up/down, fused ones alike; a removed block has none); the output
      head runs only for the positions whose logits are kept (1: the last, as ``generate`` and llama.cpp
      without ``logits_all`` do).
    - Attention: with causal masking, new token ``i`` (0-based) attends to ``past_tokens + i + 1`` keys.
      For each key, every kept query head does one dot product of ``head_dim`` (scores, ``Q K^T``) and
      one ``head_dim``-wide multiply-add of the value (``A V``): ``2 x heads x head_dim`` multiply-adds
      per (query, key) pair, summed over the layers' kept heads (GQA shares K and V between query heads
      but not this work). Kernels that compute the masked half anyway do more; this counts the useful work.
    - Not counted: the embedding lookup (no arithmetic), norms, rotary embedding, softmax, activations,
      residual adds and biases: O(hidden) per token, against O(hidden^2) for the linear layers.

    Prefill of a prompt of length L: ``forward_flops(s, L)``; the decode step that feeds position ``p``:
    ``forward_flops(s, 1, past_tokens=p)``.
    """
    if new_tokens < 1 or past_tokens < 0 or not 0 <= logits_tokens <= new_tokens:
        raise ValueError(f"bad token counts: new {new_tokens}, past {past_tokens}, logits {logits_tokens}")
    linear = new_tokens * shapes.linear_macs + logits_tokens * shapes.head_macs
    pairs = new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2  # (query, key) pairs, causal
    attention = 2 * pairs * sum(shapes.attention_widths)
    return 2 * (linear + attention)


def prefill_flops_per_token(shapes: ModelShapes, prompt_len: int) -> float:
    """FLOPs per prompt token of one prefill (last position's logits only)."""
    return forward_flops(shapes, prompt_len) / prompt_len


def decode_flops_per_token(shapes: ModelShapes, prompt_len: int, new_tokens: int) -> float:
    """FLOPs per token of the ``new_tokens - 1`` decode steps after a prefill of ``prompt_len`` (the
    first new token comes from the prefill): the steps feed positions prompt_len .. prompt_len + new - 2."""
    steps = range(prompt_len, prompt_len + new_tokens - 1)
    if not steps:
        raise ValueError("decode needs new_tokens >= 2")
    return sum(forward_flops(shapes, 1, past_tokens=p) for p in steps) / len(steps)


def model_shapes(model: Any) -> ModelShapes:
    """``ModelShapes`` of a loaded (dense or pruned) causal LM, from its weights."""
    from torch import nn

    from pruning.families import adapter_for

    head = model.get_output_embeddings()
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    widths = tuple(
        adapter.geometry(layer, head_dim).num_heads * head_dim for layer in adapter.decoder_layers(model)
    )
    return ModelShapes(linear, head.in_features * head.out_features, widths)


# ------------------------------------------------------------------------------------------- models


@dataclass
class Variant:
    """One model under test: its label, where it came from, the model, and what it costs."""

    label: str
    path: str
    model: Any
    params: int
    shapes: ModelShapes


def load_variant(
    label: str, path: str, dtype: str = "float32", attn_implementation: str | None = None
) -> Variant:
    """A checkpoint directory (dense or pruned; ``load_pruned_model`` reads both) in eval mode on the CPU."""
    import torch

    from pruning.checkpoint import load_pruned_model

    model = load_pruned_model(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    params = sum(p.numel() for p in model.parameters())
    return Variant(label, str(path), model.eval(), params, model_shapes(model))


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


def time_prefill(model: Any, ids: Any) -> float:
    """Seconds of one forward over ``ids`` with the KV cache built and the last position's logits."""
    import torch

    mask = torch.ones_like(ids)
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def time_generate(model: Any, ids: Any, new_tokens: int) -> dict[str, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, stamped at every step by a logits processor.

    ``decode_s``: first stamp (after the prompt's forward) to the last: ``new_tokens - 1`` decode steps.
    ``generate_prefill_s``: call to first stamp (generate's set-up and the prompt's forward).
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
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
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([clock]),
        )
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
    prefill_s = time_prefill(variant.model, ids)
    generated = time_generate(variant.model, ids, new_tokens)
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
    label: str, llm: Any, prompt: Sequence[int], decode_ids: Sequence[int]
) -> dict[str, Any]:
    """One repetition in llama.cpp, batch 1: ``eval(prompt)`` after ``reset()``, then one ``eval`` per
    token of ``decode_ids`` (``new_tokens - 1`` fixed ids)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    prefilled = time.perf_counter()
    for token in decode_ids:
        llm.eval([token])
    end = time.perf_counter()
    prefill_s, decode_s = prefilled - start, end - prefilled
    return {
        "engine": LLAMA_CPP,
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
    llama: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``warmup + runs`` repetitions; in each, every batch size, and at each every model in turn, then
    llama.cpp (``llama``: label -> opened model, batch 1) for every model it has. Returns every row,
    warm-up rows marked ``warmup: true``."""
    if new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode is timed from the first token to the last)")
    vocab = min(int(v.model.config.vocab_size) for v in variants)
    ids = prompt_ids(vocab, max(batch_sizes), prompt_len, seed)
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
        for label, llm in (llama or {}).items():
            row = measure_llama_cpp(label, llm, ids[0].tolist(), decode_ids)
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


def summarize(rows: Sequence[dict[str, Any]], dense: str = DENSE) -> list[dict[str, Any]]:
    """Per (engine, batch, model), in first-seen order: median, min and max of prefill and decode tok/s
    over the counted repetitions, and the median's ratio to the dense model's at the same engine and batch."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("warmup"):
            groups.setdefault((row["engine"], row["batch"], row["model"]), []).append(row)
    out = []
    for (engine, batch, model), group in groups.items():
        entry: dict[str, Any] = {"engine": engine, "batch": batch, "model": model, "runs": len(group)}
        for phase in ("prefill", "decode"):
            values = [r[f"{phase}_tok_s"] for r in group]
            entry[phase] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out.append(entry)
    medians = {(e["engine"], e["batch"], e["model"]): e for e in out}
    for entry in out:
        base = medians.get((entry["engine"], entry["batch"], dense))
        for phase in ("prefill", "decode"):
            entry[phase]["x_dense"] = entry[phase]["median"] / base[phase]["median"] if base else None
    return out


# --------------------------------------------------------------------------------------------- report


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(summary: Sequence[dict[str, Any]], cost_rows: Sequence[dict[str, Any]]) -> str:
    """The speed table: one row per engine, batch and model; ratios to dense next to the FLOPs ratios."""
    cost = {c["model"]: c for c in cost_rows}
    dense = cost_rows[0]
    header = [
        "engine",
        "batch",
        "model",
        "params removed",
        "prefill tok/s (min-max)",
        "prefill x dense",
        "prefill FLOPs x",
        "decode tok/s (min-max)",
        "decode x dense",
        "decode FLOPs x",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in summary:
        c = cost.get(entry["model"])
        cells = [
            entry["engine"],
            str(entry["batch"]),
            entry["model"],
            _share(c["params_removed"]) if c else "?",
        ]
        for phase in ("prefill", "decode"):
            stats = entry[phase]
            cells.append(f"{_rate(stats['median'])} ({_rate(stats['min'])}-{_rate(stats['max'])})")
            cells.append("n/a" if stats["x_dense"] is None else f"{stats['x_dense']:.2f}")
            key = f"{phase}_flops_per_token"
            cells.append(f"{dense[key] / c[key]:.2f}" if c else "?")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(cost_rows: Sequence[dict[str, Any]]) -> str:
    header = [
        "model",
        "parameters",
        "removed",
        "prefill MFLOP/token",
        "removed",
        "decode MFLOP/token",
        "removed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for c in cost_rows:
        cells = [
            c["model"],
            f"{c['params']:,}",
            _share(c["params_removed"]),
            f"{c['prefill_flops_per_token'] / 1e6:,.1f}",
            _share(c["prefill_flops_per_token_removed"]),
            f"{c['decode_flops_per_token'] / 1e6:,.1f}",
            _share(c["decode_flops_per_token_removed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol(args: argparse.Namespace, llama_version: str | None, llama_ran: bool) -> str:
    """The sentences above the table."""
    text = (
        f"Each of {args.runs} repetitions (after {args.warmup} warm-up) measures every model in turn at "
        f"every batch size (interleaved, so drift affects all alike); cells are the median with min-max. "
        f"transformers, {args.dtype}, batch sizes {', '.join(map(str, args.batch_sizes))}: a prompt of "
        f"{args.prompt_len} fixed random token ids (seed {args.seed}) per sequence; prefill tok/s = batch x "
        f"{args.prompt_len} / one forward over the prompt (`use_cache=True`, last position's logits only); "
        f"decode tok/s = batch x {args.new_tokens - 1} / the time inside greedy `generate` of exactly "
        f"{args.new_tokens} new tokens (`min_new_tokens = max_new_tokens`, `use_cache=True`) from its first "
        f"step (the prompt's forward) to its last, i.e. the {args.new_tokens - 1} one-token forwards with "
        "the KV cache and generate's per-step work."
    )
    if llama_ran:
        text += (
            f" llama.cpp (llama-cpp-python {llama_version}), batch 1, same prompt: prefill = "
            f"`llm.eval(prompt)` after `llm.reset()` (`n_batch` = {args.prompt_len}); decode = "
            f"{args.new_tokens - 1} calls of `llm.eval([token])` fed fixed random token ids."
        )
    text += (
        " `x dense`: the model's median over the dense model's (same engine and batch). `FLOPs x`: dense "
        "FLOPs per token over the model's (linear layers' multiply-adds from the weight shapes, plus causal "
        "attention scores and values of the kept query heads; output head for the last position only): "
        "the speed-up a time proportional to FLOPs would give."
    )
    return text


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    from pruning.run_record import git_revision, package_versions

    found = package_versions(("pruning", "torch", "transformers", "safetensors", "numpy", "llama-cpp-python"))
    if found["llama-cpp-python"] == "not installed" and llama_cpp_version():  # importable, no metadata
        found["llama-cpp-python"] = f"{llama_cpp_version()} (llama_cpp.__version__)"
    revision = git_revision(ROOT)
    if revision:
        found["git"] = revision
    return found


def report(
    summary: Sequence[dict[str, Any]],
    cost_rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    info, vers = meta["machine"], meta["versions"]
    llama_ran = any(e["engine"] == LLAMA_CPP for e in summary)
    lines = [
        "# Speed: dense and pruned on the CPU",
        "",
        f"`python benchmarks/speed.py {shlex.join(meta['argv'])}`, finished {meta['finished']}.",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable); torch threads "
        f"{meta['torch_threads']}" + (f"; llama.cpp threads {args.threads}" if llama_ran else ""),
        "- " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "- Models: " + "; ".join(f"{c['model']} = `{c['path']}`" for c in cost_rows),
        *([f"- {meta['llama_cpp_note']}"] if meta.get("llama_cpp_note") else []),
        "",
        protocol(args, meta.get("llama_cpp_version"), llama_ran),
        "",
        table(summary, cost_rows),
        "",
        f"Parameters and FLOPs per token (prefill of {args.prompt_len} tokens; decode: mean over the "
        f"{args.new_tokens - 1} steps after it):",
        "",
        cost_table(cost_rows),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def _label(path: str) -> str:
    """``results/smollm2_0.2/models`` -> ``smollm2_0.2``; other directories by their own name."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "models" else p.name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m", help="built-in name or checkpoint directory")
    parser.add_argument(
        "--pruned",
        action="append",
        default=[],
        metavar="DIR",
        help="pruned checkpoint directory (repeatable)",
    )
    parser.add_argument(
        "--label", action="append", default=[], help="name of each --pruned in order (default: its directory)"
    )
    parser.add_argument("--batch-sizes", default="1,8", help="comma list (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="counted repetitions (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted repetitions first (default 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and llama.cpp threads (default: all cores)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa (default: transformers')")
    parser.add_argument("--seed", type=int, default=0, help="of the random prompt token ids")
    parser.add_argument(
        "--gguf-dense", default=None, metavar="FILE", help="GGUF of the dense model (llama.cpp)"
    )
    parser.add_argument(
        "--gguf-pruned", action="append", default=[], metavar="FILE", help="GGUF of each --pruned, in order"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (default %(default)s)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not args.pruned:
        raise SystemExit("--pruned: give at least one pruned checkpoint directory")
    if len(args.label) > len(args.pruned):
        raise SystemExit("--label: more labels than --pruned directories")
    if args.gguf_pruned and len(args.gguf_pruned) != len(args.pruned):
        raise SystemExit("--gguf-pruned: give one per --pruned, in the same order")
    for path in [args.gguf_dense, *args.gguf_pruned]:
        if path and not Path(path).is_file():
            raise SystemExit(f"GGUF file {path} does not exist")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.runs < 1 or args.warmup < 0:
        raise SystemExit("need --new-tokens >= 2, --prompt-len >= 1, --runs >= 1, --warmup >= 0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_args(args)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.threads is None:
        args.threads = machine()["cores_usable"]

    import torch
    import transformers

    from pruning.models import resolve

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    labels = [*args.label, *(_label(p) for p in args.pruned[len(args.label) :])]
    if len(set(labels)) != len(labels) or DENSE in labels:
        raise SystemExit(f"model labels must be distinct and not {DENSE!r}: {labels}; use --label")
    variants = [load_variant(DENSE, resolve(args.dense), args.dtype, args.attn_implementation)]
    variants += [
        load_variant(label, path, args.dtype, args.attn_implementation)
        for label, path in zip(labels, args.pruned, strict=True)
    ]
    cost_rows = costs(variants, args.prompt_len, args.new_tokens)
    for c in cost_rows:
        logger.info(
            "%s: %s parameters (%.1f%% removed), prefill FLOPs/token %.1f%% removed, decode %.1f%% removed",
            c["model"],
            f"{c['params']:,}",
            100 * c["params_removed"],
            100 * c["prefill_flops_per_token_removed"],
            100 * c["decode_flops_per_token_removed"],
        )

    llama_version = llama_cpp_version()
    gguf = {DENSE: args.gguf_dense} if args.gguf_dense else {}
    gguf.update({label: path for label, path in zip(labels, args.gguf_pruned, strict=False)})
    llama: dict[str, Any] = {}
    note = None
    if gguf and llama_version is None:
        note = "llama.cpp: skipped, `llama_cpp` (llama-cpp-python) is not importable"
        logger.info(note)
    elif gguf:
        llama = {
            label: open_llama_cpp(path, args.prompt_len, args.new_tokens, args.threads)
            for label, path in gguf.items()
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl, meta_file = out.with_suffix(".jsonl"), out.with_suffix(".meta.json")
    jsonl.write_text("")

    def write_row(row: dict[str, Any]) -> None:
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")

    rows = measure(
        variants,
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        seed=args.seed,
        llama=llama,
        on_row=write_row,
    )
    summary = summarize(rows)
    meta = {
        "argv": argv,
        "finished": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": machine(),
        "versions": versions(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "llama_cpp_version": llama_version,
        "llama_cpp_note": note,
        "gguf": gguf,
        "costs": cost_rows,
        "summary": summary,
    }
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    text = report(summary, cost_rows, meta, args)
    out.write_text(text)
    print(text)
    logger.info("wrote %s, %s and %s", out, jsonl, meta_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
