"""Prefill and decode tokens per second of the dense and the pruned SmolLM2-135M, on the CPU or a GPU.

    python benchmarks/speed.py --pruned results/smollm2_0.2/models [--pruned DIR --label NAME ...]
        [--dense smollm2-135m] [--engines transformers,llama.cpp] [--device cpu|cuda|cuda:N]
        [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 64] [--runs 5] [--warmup 1] [--threads N]
        [--dtype float32] [--attn-implementation eager|sdpa] [--seed 0]
        [--gguf-dense [TYPE=]FILE --gguf-pruned [TYPE=]FILE ...] [--out benchmarks/results/speed.md]

Every model is loaded once (``--dense``: a built-in name, resolved as the pipeline resolves it, or a
checkpoint directory; ``--pruned``: checkpoint directories the pipeline wrote, loaded with
``load_pruned_model``), then each repetition measures all of them in turn, every engine (dense, pruned,
dense, pruned, ...: interleaved, so that drift of the machine affects every model alike), after
``--warmup`` repetitions that are recorded but not counted. Cells are the median of ``--runs``
repetitions, with the minimum and maximum; ``x dense`` is the pruned median over the dense median of the
same engine and batch.

``--engines`` (default: transformers, and llama.cpp when GGUF files are given) picks what is timed; the
models are loaded into transformers either way, for their FLOPs and the prompt's vocabulary.

transformers, for each batch size, on ``--device`` (the weights are read straight onto it): the prompt
is ``batch x prompt_len`` fixed random token ids (seeded; no tokenizer). Prefill: one forward over the
prompt with ``use_cache=True`` and the logits of the last position only (``logits_to_keep=1``, as
``generate`` computes them). Decode: greedy ``generate`` of exactly ``new_tokens`` tokens
(``min_new_tokens = max_new_tokens``, ``use_cache=True``), timed inside ``generate`` by a logits
processor that stamps each step: from the first step (the prompt's forward, which yields the first
token) to the last, ``new_tokens - 1`` forward passes of one token per sequence with the KV cache,
generate's per-step work (argmax, stopping checks) included; decode tok/s = ``batch x (new_tokens - 1)``
over that time. On a GPU, ``torch.cuda.synchronize()`` before and after each timed region and before
each stamp, so a time ends when the kernels have run, not when they were queued.

llama.cpp (when ``llama_cpp``, i.e. llama-cpp-python, is importable and GGUF files are given; batch 1,
on the CPU whatever ``--device``): prefill is ``llm.eval(prompt)`` after ``llm.reset()`` (the same
token ids, ``n_batch = prompt_len``, so one batch, logits of the last token only); decode is
``new_tokens - 1`` calls of ``llm.eval([token])`` fed fixed random token ids (which tokens are fed does
not change the work; llama-cpp-python keeps no logits with ``logits_all=False`` to take an argmax from).
GGUF files come in sets: ``--gguf-dense FILE`` and one ``--gguf-pruned FILE`` per ``--pruned``, in
order, is one set (engine ``llama.cpp``); several sets are told apart by their type, every file
labelled (``--gguf-dense f16=A --gguf-dense q8_0=B --gguf-pruned f16=C --gguf-pruned q8_0=D``), each
type a whole set (one dense, one per ``--pruned``) and its own engine (``llama.cpp f16``, ``llama.cpp
q8_0``) with its own dense row for ``x dense``. The type is a label, not read from the file. A value
whose text before its first ``=`` is a bare word is read as ``TYPE=FILE``: write an unlabelled
``a=b.gguf`` as ``./a=b.gguf``.

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
import re
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
from speed_measure import (
    DENSE,
    ENGINES,
    LLAMA_CPP,
    TRANSFORMERS,
    costs,
    llama_cpp_engine,
    llama_cpp_version,
    load_variant,
    measure,
    open_llama_cpp,
)
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
    "parse_args",
    "prefill_flops_per_token",
    "summarize",
    "table",
]

logger = logging.getLogger("speed")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed.md"
GGUF_TYPE = re.compile(r"[A-Za-z0-9_]+")  # f16, bf16, q8_0, q4_K_M: the label before '='
DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


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
    parser.add_argument(
        "--engines",
        default=None,
        help=f"comma list of {', '.join(ENGINES)} (default: transformers, and llama.cpp with GGUF files)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N: where transformers runs (llama.cpp: the CPU)"
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
        "--gguf-dense",
        action="append",
        default=[],
        metavar="[TYPE=]FILE",
        help="GGUF of the dense model (llama.cpp); once per TYPE for several sets (f16=FILE, q8_0=FILE)",
    )
    parser.add_argument(
        "--gguf-pruned",
        action="append",
        default=[],
        metavar="[TYPE=]FILE",
        help="GGUF of each --pruned, in order (per TYPE when the files are labelled)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (default %(default)s)")
    return parser


def _split_gguf(value: str) -> tuple[str | None, str]:
    """``f16=/a/m.gguf`` is typed; a value without a bare type before its first ``=`` stays a whole path,
    so the unlabelled form of earlier runs reads as before."""
    gguf_type, sep, path = value.partition("=")
    return (gguf_type, path) if sep and GGUF_TYPE.fullmatch(gguf_type) else (None, value)


def gguf_sets(dense: list[str], pruned: list[str], labels: list[str]) -> dict[str, dict[str, str]]:
    """engine -> model label -> GGUF file, dense first, from the ``--gguf-dense`` and ``--gguf-pruned``
    values; ``labels`` are the ``--pruned`` models' in order. A set that does not pair every file with
    one model is one SystemExit line: a ratio to the wrong dense, or a missing one, would go unnoticed."""
    values = [("--gguf-dense", v, *_split_gguf(v)) for v in dense]
    values += [("--gguf-pruned", v, *_split_gguf(v)) for v in pruned]
    typed = [v for v in values if v[2] is not None]
    if typed and len(typed) != len(values):
        untyped = next(v for v in values if v[2] is None)
        raise SystemExit(
            f"{untyped[0]} {untyped[1]}: no TYPE= although {typed[0][0]} {typed[0][1]} has one; "
            "label every GGUF file (f16=FILE) or none"
        )
    if not typed:
        if len(dense) > 1:
            raise SystemExit(
                "--gguf-dense: given more than once without TYPE=; label each set "
                "(--gguf-dense f16=FILE --gguf-dense q8_0=FILE, and --gguf-pruned likewise)"
            )
        if pruned and len(pruned) != len(labels):
            raise SystemExit("--gguf-pruned: give one per --pruned, in the same order")
        one_set = ({DENSE: dense[0]} if dense else {}) | dict(zip(labels, pruned, strict=False))
        return {llama_cpp_engine(None): one_set} if one_set else {}
    sets: dict[str, dict[str, list[str]]] = {}
    for option, _, gguf_type, path in typed:
        if not path:
            raise SystemExit(f"{option} {gguf_type}=: no file after the '='")
        files = sets.setdefault(gguf_type, {"--gguf-dense": [], "--gguf-pruned": []})
        files[option].append(path)
    out = {}
    for gguf_type, files in sets.items():
        if len(files["--gguf-dense"]) != 1:
            given = "none" if not files["--gguf-dense"] else f"{len(files['--gguf-dense'])} files"
            raise SystemExit(f"--gguf-dense {gguf_type}=FILE: give exactly one (got {given}) for its x dense")
        if len(files["--gguf-pruned"]) != len(labels):
            raise SystemExit(
                f"--gguf-pruned {gguf_type}=FILE: got {len(files['--gguf-pruned'])} for {len(labels)} "
                "--pruned; give one per --pruned, in the same order"
            )
        out[llama_cpp_engine(gguf_type)] = dict(
            zip([DENSE, *labels], files["--gguf-dense"] + files["--gguf-pruned"], strict=True)
        )
    return out


def _engines(value: str | None, gguf: dict[str, dict[str, str]], device: str) -> list[str]:
    """The engines to time: those named, or transformers and, with GGUF files, llama.cpp. A choice that
    contradicts the other options (GGUF files llama.cpp would not read, a GPU nothing would use) is an
    error rather than a silent skip."""
    if value is None:
        return [TRANSFORMERS, *([LLAMA_CPP] if gguf else [])]
    engines = [e.strip() for e in value.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise SystemExit(f"--engines {value!r}: choose from {', '.join(ENGINES)} (comma list)")
    if LLAMA_CPP in engines and not gguf:
        raise SystemExit("--engines llama.cpp: give its GGUF files (--gguf-dense, --gguf-pruned)")
    if gguf and LLAMA_CPP not in engines:
        raise SystemExit(f"--engines {value}: GGUF files given but llama.cpp is not among the engines")
    if device != "cpu" and TRANSFORMERS not in engines:
        raise SystemExit(f"--device {device} places transformers, which --engines {value} leaves out")
    return list(dict.fromkeys(engines))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments, checked and resolved before any model loads: ``labels`` (of the ``--pruned``
    models, in order), ``gguf`` (engine -> model label -> file), ``engines`` and ``batch_sizes``."""
    args = build_parser().parse_args(argv)
    if not args.pruned:
        raise SystemExit("--pruned: give at least one pruned checkpoint directory")
    if len(args.label) > len(args.pruned):
        raise SystemExit("--label: more labels than --pruned directories")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.runs < 1 or args.warmup < 0:
        raise SystemExit("need --new-tokens >= 2, --prompt-len >= 1, --runs >= 1, --warmup >= 0")
    if not DEVICE.fullmatch(args.device):
        raise SystemExit(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers") from None
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise SystemExit("--batch-sizes: give at least one, each >= 1")
    args.labels = [*args.label, *(_label(p) for p in args.pruned[len(args.label) :])]
    if len(set(args.labels)) != len(args.labels) or DENSE in args.labels:
        raise SystemExit(f"model labels must be distinct and not {DENSE!r}: {args.labels}; use --label")
    args.gguf = gguf_sets(args.gguf_dense, args.gguf_pruned, args.labels)
    for files in args.gguf.values():
        for path in files.values():
            if not Path(path).is_file():
                raise SystemExit(f"GGUF file {path} does not exist")
    args.engines_named = args.engines is not None
    args.engines = _engines(args.engines, args.gguf, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is None:
        args.threads = machine()["cores_usable"]
    llama_version = llama_cpp_version()
    note = None
    if LLAMA_CPP in args.engines and llama_version is None:
        if args.engines_named:
            raise SystemExit("--engines llama.cpp: `llama_cpp` (llama-cpp-python) is not importable")
        note = "llama.cpp: skipped, `llama_cpp` (llama-cpp-python) is not importable"
        logger.info(note)

    import torch
    import transformers

    from pruning.source.builtin import resolve

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load = [(DENSE, resolve(args.dense)), *zip(args.labels, args.pruned, strict=True)]
    variants = [
        load_variant(label, path, args.dtype, args.attn_implementation, args.device) for label, path in load
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

    llama: dict[str, dict[str, Any]] = {}
    if LLAMA_CPP in args.engines and llama_version is not None:
        llama = {
            engine: {
                label: open_llama_cpp(path, args.prompt_len, args.new_tokens, args.threads)
                for label, path in files.items()
            }
            for engine, files in args.gguf.items()
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
        batch_sizes=args.batch_sizes if TRANSFORMERS in args.engines else (),
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
        "engines": args.engines,
        "device": args.device,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "llama_cpp_version": llama_version,
        "llama_cpp_note": note,
        "gguf": args.gguf,
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
