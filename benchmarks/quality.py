"""Reference pruning methods and this project's criteria on SmolLM2-135M: one run, same data, one table.

    python benchmarks/quality.py [--ratios 0.2,0.3,0.5] [--methods dense,flap,ours] [--device cpu|cuda]
        [--eval-tokens 32768] [--other-eval-tokens 16384] [--eval-texts NAME=SOURCE,...]
        [--calib-samples 64] [--calib-len 256] [--seed 0] [--out benchmarks/results/quality.md]
        [--model smollm2-135m] [--threads N] [--quick]

Every (method, ratio) row runs in a fresh process, so its wall time and peak resident memory (the
process's own ``VmHWM``) are its own: it loads SmolLM2-135M in float32, cuts the calibration windows
from WikiText-2's validation split (seeded), prunes ``ratio`` of all parameters, checks the count,
and measures perplexity on every evaluation text (512-token windows: the first ``--eval-tokens`` of
the first text, WikiText-2 test by default, and the first ``--other-eval-tokens`` of the others, code
and software documentation held out from the built-in texts). Dense is evaluated once.

Reference methods are ``benchmarks/references/`` (random, uniform magnitude, Torch-Pruning's own
pruner, uniform Wanda-sp, LLM-Pruner's Taylor, FLAP). This project's rows run the real pipeline
(``configs/smollm2_0.2.yaml`` with the overrides of ``OURS``, hooks off) and evaluate its checkpoint
reloaded with ``load_pruned_model``; their prune time is run.json's stages but load and save
(tokenize + score + plan + prune, and any stage added later).

The table (with the machine, package versions and protocol) goes to ``--out``, the raw rows, one JSON
object per line, next to it (``.jsonl``). ``--quick`` is a smoke run: tiny settings, one thread,
ratio 0.2, written to ``quality_quick.md`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from provenance import machine, versions
from quality_methods import (
    CALIBRATION,
    CHILD_ENV,
    DEFAULT_EVAL_TEXTS,
    DENSE,
    MODEL,
    OURS,
    REFERENCES,
    ROOT,
    EvalText,
    RowSpec,
    method_key,
)
from quality_report import PACKAGES, render
from quality_rows import child_main, text_file

logger = logging.getLogger("quality")


# ------------------------------------------------------------------------------------------ parent side


def parse_eval_texts(text: str, eval_tokens: int, other_tokens: int) -> list[EvalText]:
    """``NAME=SOURCE,...``: the first text gets ``eval_tokens``, the others ``other_tokens``."""
    texts = []
    for i, item in enumerate(part for part in text.split(",") if part.strip()):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise SystemExit(f"--eval-texts: {item!r} is not NAME=SOURCE")
        texts.append(EvalText(name.strip(), source.strip(), eval_tokens if i == 0 else other_tokens))
    return texts


def available_texts(texts: list[EvalText]) -> list[EvalText]:
    """The texts whose source can be read here; the others are skipped with a warning (the built-in
    code and docs texts need a ``pruning.calibration.data`` that knows ``builtin:`` sources)."""
    from pruning.calibration.data import source_text

    usable = []
    for text in texts:
        try:
            source_text(text.source, "evaluation")
        except Exception as exc:  # noqa: BLE001 - any reason to skip is logged
            logger.warning("evaluation text %s (%s) skipped: %s", text.name, text.source, exc)
            continue
        usable.append(text)
    return usable


def select_methods(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Requested rows in table order: dense, the references, this project's variants (``ours`` = all)."""
    catalogue = [(DENSE, {})] + [(name, {}) for name in REFERENCES] + OURS
    if spec.strip().lower() in ("", "all"):
        return catalogue
    wanted = {method_key(name) for name in spec.split(",") if name.strip()}
    known = {method_key(name) for name, _ in catalogue} | {"ours"}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(
            f"--methods: unknown {unknown}; known: {', '.join(name for name, _ in catalogue)}, ours"
        )
    return [
        (name, overrides)
        for name, overrides in catalogue
        if method_key(name) in wanted or ("ours" in wanted and method_key(name).startswith("ours"))
    ]


def run_child(spec: RowSpec, workdir: Path) -> dict[str, Any]:
    """One row in a fresh interpreter; a crash becomes a row that says so."""
    row_out = workdir / f"row-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps(asdict(spec)),
        "--row-out",
        str(row_out),
    ]
    env = dict(CHILD_ENV)
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    logger.info("row: %s at %.0f%%", spec.method, 100 * spec.ratio)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0 or not row_out.is_file():
        logger.error("row %s at %s failed with exit code %s", spec.method, spec.ratio, result.returncode)
        return {
            "method": spec.method,
            "ratio": spec.ratio,
            "error": f"child exited {result.returncode}",
            "wall_s": wall,
        }
    row = json.loads(row_out.read_text())
    row["wall_s"] = round(wall, 1)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ratios", default=None, help="comma list of shares of all parameters (default 0.2,0.3,0.5)"
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma list of {DENSE}, {', '.join(REFERENCES)}, "
        "this project's names (ours: activation, ...) or ours; default all",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--model", default=MODEL, help="built-in name or model directory (default %(default)s)"
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=None, help="tokens of the first text (default 32768)"
    )
    parser.add_argument(
        "--other-eval-tokens", type=int, default=None, help="tokens of the others (default 16384)"
    )
    parser.add_argument(
        "--eval-texts", default=DEFAULT_EVAL_TEXTS, help="NAME=SOURCE,... (first: --eval-tokens)"
    )
    parser.add_argument("--calib-source", default=str(CALIBRATION))
    parser.add_argument("--calib-samples", type=int, default=None, help="default 64")
    parser.add_argument("--calib-len", type=int, default=None, help="default 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size (the config's)")
    parser.add_argument("--eval-batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's)")
    parser.add_argument("--out", default=None, help="markdown report (default benchmarks/results/quality.md)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny settings, one thread, ratio 0.2"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="rows run at once, each in its own process (default 1)"
    )
    parser.add_argument(
        "--texts-dir", default=None, help="read builtin:NAME texts from DIR/NAME.txt (another machine)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the .jsonl's finished rows, run the rest")
    parser.add_argument(
        "--keep-checkpoints", default=None, metavar="DIR", help="copy our rows' checkpoints into DIR"
    )
    parser.add_argument(
        "--render", action="store_true", help="only write --out from its .jsonl and .meta.json (no run)"
    )
    parser.add_argument("--note", default="", help="a paragraph for the report's head (how the run was made)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> None:
    """Fill what the user left out: the issue's protocol, or tiny settings with --quick."""
    quick = args.quick
    defaults = {
        "ratios": "0.2" if quick else "0.2,0.3,0.5",
        "eval_tokens": 2048 if quick else 32768,
        "other_eval_tokens": 1024 if quick else 16384,
        "calib_samples": 8 if quick else 64,
        "calib_len": 128 if quick else 256,
        "threads": 1 if quick else None,
        "out": str(ROOT / "benchmarks" / "results" / ("quality_quick.md" if quick else "quality.md")),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _ordered(rows: list[dict[str, Any]], methods: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Dense first, then by ratio, then in catalogue order."""
    order = {method_key(name): i for i, (name, _) in enumerate(methods)}
    return sorted(
        rows,
        key=lambda r: (
            r.get("method") != DENSE,
            r.get("ratio", 0),
            order.get(method_key(r.get("method", "")), 99),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        return child_main(args.child, args.row_out)
    _defaults(args)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = select_methods(args.methods)
    texts = parse_eval_texts(args.eval_texts, args.eval_tokens, args.other_eval_tokens)
    if args.texts_dir:
        texts = [EvalText(t.name, text_file(t.source, args.texts_dir), t.max_tokens) for t in texts]
    texts = available_texts(texts)
    if not texts:
        raise SystemExit("no evaluation text is readable")
    keep = Path(args.keep_checkpoints) if args.keep_checkpoints else None
    if keep is not None and (keep.is_file() or (keep.is_dir() and any(keep.iterdir()))):
        raise SystemExit(f"--keep-checkpoints {keep}: give a new or empty folder (nothing in it is replaced)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    meta = out.with_suffix(".meta.json")
    if args.render:  # the rows of an earlier (perhaps interrupted) run, on the machine it ran on
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        where = json.loads(meta.read_text())
        where["note"] = args.note
        finished = datetime.fromtimestamp(jsonl.stat().st_mtime, timezone.utc)
        where["finished"] = finished.isoformat(timespec="minutes")
        argv = where["argv"]
        args = build_parser().parse_args(argv)
        _defaults(args)
        texts = parse_eval_texts(args.eval_texts, args.eval_tokens, args.other_eval_tokens)
        if args.texts_dir:
            texts = [EvalText(t.name, text_file(t.source, args.texts_dir), t.max_tokens) for t in texts]
        out.write_text(render(_ordered(rows, select_methods(args.methods)), texts, args, argv, where))
        logger.info("wrote %s from %d rows of %s", out, len(rows), jsonl)
        return 0
    meta.write_text(json.dumps({"machine": machine(), "versions": versions(PACKAGES), "argv": argv}))
    rows: list[dict[str, Any]] = []
    if args.resume and jsonl.is_file():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "error" not in r]
        jsonl.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    else:
        jsonl.write_text("")
    done = {(method_key(r["method"]), round(r.get("ratio", 0), 4)) for r in rows}
    # the first ratio's rows first: with a time limit, the table's main column is complete soonest
    specs = [
        RowSpec(
            method=name,
            ratio=ratio,
            model=args.model,
            device=args.device,
            threads=args.threads,
            calib_source=str(Path(args.calib_source).resolve()),
            calib_samples=args.calib_samples,
            calib_len=args.calib_len,
            seed=args.seed,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            texts=texts,
            overrides=overrides,
            texts_dir=args.texts_dir,
            quick=args.quick,
            keep_dir=args.keep_checkpoints,
        )
        for ratio in ratios
        for name, overrides in methods
        if name != DENSE or ratio == ratios[0]
    ]
    specs = [
        dataclasses.replace(s, ratio=0.0) if s.method == DENSE else s
        for s in specs
        if (method_key(s.method), 0.0 if s.method == DENSE else round(s.ratio, 4)) not in done
    ]
    lock = threading.Lock()

    def one(spec: RowSpec) -> None:
        row = run_child(spec, Path(tmp))
        with lock:
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp, ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, specs))
    rows = _ordered(rows, methods)
    report = render(rows, texts, args, argv)
    out.write_text(report)
    print(report)
    logger.info("wrote %s and %s", out, jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
