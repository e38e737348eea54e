"""The speed tables: medians side by side, ratios to dense, the FLOPs removed, and the protocol."""

from __future__ import annotations

import argparse
import shlex
import statistics
from collections.abc import Sequence
from typing import Any

from speed_measure import DENSE, LLAMA_CPP, TRANSFORMERS


def summarize(rows: Sequence[dict[str, Any]], dense: str = DENSE) -> list[dict[str, Any]]:
    """Per (engine, batch, model), in first-seen order: median, min and max of prefill and decode tok/s
    over the counted repetitions, and the median's ratio to the dense model's at the same engine and batch
    (each GGUF type is an engine of its own, so a q8_0 model is compared with the q8_0 dense)."""
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


def _llama_engines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The llama.cpp engines (one per GGUF type) in the table's order."""
    return list(dict.fromkeys(e["engine"] for e in summary if e["engine"].startswith(LLAMA_CPP)))


def protocol(
    args: argparse.Namespace,
    llama_version: str | None,
    llama_engines: Sequence[str],
    transformers_ran: bool,
) -> str:
    """The sentences above the table."""
    text = (
        f"Each of {args.runs} repetitions (after {args.warmup} warm-up) measures every model of every "
        "engine in turn at every batch size (interleaved, so drift affects all alike); cells are the "
        "median with min-max."
    )
    if transformers_ran:
        sync = ""
        if args.device != "cpu":
            sync = " (`torch.cuda.synchronize()` before and after each timed region and each step)"
        attention = args.attn_implementation or "transformers' default"
        text += (
            f" transformers on {args.device}{sync}, {args.dtype}, attention {attention}, batch sizes "
            f"{', '.join(map(str, args.batch_sizes))}: a prompt of {args.prompt_len} fixed random token ids "
            f"(seed {args.seed}) per sequence; prefill tok/s = batch x {args.prompt_len} / one forward over "
            f"the prompt (`use_cache=True`, last position's logits only); decode tok/s = batch x "
            f"{args.new_tokens - 1} / the time inside greedy `generate` of exactly {args.new_tokens} new "
            f"tokens (`min_new_tokens = max_new_tokens`, `use_cache=True`) from its first step (the prompt's "
            f"forward) to its last, i.e. the {args.new_tokens - 1} one-token forwards with the KV cache and "
            "generate's per-step work."
        )
    if llama_engines:
        sets = "" if llama_engines == [LLAMA_CPP] else f" ({', '.join(llama_engines)}: one GGUF set each)"
        text += (
            f" llama.cpp{sets} (llama-cpp-python {llama_version}) on the CPU, batch 1, same prompt: "
            f"prefill = `llm.eval(prompt)` after `llm.reset()` (`n_batch` = {args.prompt_len}); decode = "
            f"{args.new_tokens - 1} calls of `llm.eval([token])` fed fixed random token ids."
        )
    text += (
        " `x dense`: the model's median over the dense model's (same engine and batch). `FLOPs x`: dense "
        "FLOPs per token over the model's (linear layers' multiply-adds from the weight shapes, plus causal "
        "attention scores and values of the kept query heads; output head for the last position only): "
        "the speed-up a time proportional to FLOPs would give."
    )
    return text


def report(
    summary: Sequence[dict[str, Any]],
    cost_rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    info, vers = meta["machine"], meta["versions"]
    llama_engines = _llama_engines(summary)
    transformers_ran = any(e["engine"] == TRANSFORMERS for e in summary)
    on_gpu = transformers_ran and meta["device"] != "cpu"
    where = "the CPU"
    if on_gpu:
        where = "the GPU (transformers)" + (" and the CPU (llama.cpp)" if llama_engines else "")
    lines = [
        f"# Speed: dense and pruned on {where}",
        "",
        f"`python benchmarks/speed.py {shlex.join(meta['argv'])}`, finished {meta['finished']}.",
        "",
        *([f"- GPU: {info.get('gpu', meta['device'])}"] if on_gpu else []),
        f"- CPU: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable); torch threads "
        f"{meta['torch_threads']}" + (f"; llama.cpp threads {args.threads}" if llama_engines else ""),
        "- " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "- Models: " + "; ".join(f"{c['model']} = `{c['path']}`" for c in cost_rows),
        *([f"- {meta['llama_cpp_note']}"] if meta.get("llama_cpp_note") else []),
        "",
        protocol(args, meta.get("llama_cpp_version"), llama_engines, transformers_ran),
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
