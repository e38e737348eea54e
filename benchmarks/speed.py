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
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from provenance import machine
from provenance import versions as _versions
from speed_flops import (
    ModelShapes,
    decode_flops_per_token,
    forward_flops,
    model_shapes,
    prefill_flops_per_token,
)
from speed_measure import DENSE, costs, llama_cpp_version, load_variant, measure, open_llama_cpp
from speed_report import report, summarize, table

# what the tests and other scripts reach through this module
__all__ = [
    "ModelShapes",
    "costs",
    "decode_flops_per_token",
    "forward_flops",
    "load_variant",
    "main",
    "measure",
    "model_shapes",
    "prefill_flops_per_token",
    "summarize",
    "table",
]

logger = logging.getLogger("speed")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed.md"


def versions() -> dict[str, str]:
    found = _versions(("pruning", "torch", "transformers", "safetensors", "numpy", "llama-cpp-python"))
    if found["llama-cpp-python"] == "not installed" and llama_cpp_version():  # importable, no metadata
        found["llama-cpp-python"] = f"{llama_cpp_version()} (llama_cpp.__version__)"
    return found


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

    from pruning.source.builtin import resolve

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
