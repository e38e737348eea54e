"""Benchmark ModelAnalyzer against loading the model with transformers.

    python benchmarks/bench_analysis.py [--runs N]

Prints medians of N runs with their targets. Missed targets are reported, not fatal; a wrong
parameter count exits non-zero. ``--child MODE ARG`` is an internal helper run in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_DIR = ROOT / "tests/fixtures/configs/llama-2-7b"
SMOL_PARAMS = 134_515_008
LLAMA_PARAMS = 6_738_415_616
# Runs a module as ``python -m`` would and prints its own peak RSS at exit. VmHWM is per address space,
# so unlike ru_maxrss it does not inherit the (large) peak of the benchmark process that spawned it.
HWM_WRAPPER = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print([f'VmHWM_kB={l.split()[1]}' for l in open('/proc/self/status') "
    "if l.startswith('VmHWM:')][0])); "
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)
CHILD_ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_rss(model_dir: str) -> None:
    """Imports are baseline; print (peak RSS during the analysis - RSS before it) in MB, and the count."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from pruning.analysis import ModelAnalyzer

    # reset VmHWM to the current RSS, so an import-time peak is not charged to the analysis
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kb("VmRSS")
    total = ModelAnalyzer(model_dir).analyze()["total_params"]
    peak = _proc_status_kb("VmHWM")
    print(json.dumps({"delta_mb": (peak - before) / 1024, "total": total}))
    print(f"VmHWM_kB={peak}")


def child_meta(config_dir: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    print(f"total={sum(p.numel() for p in model.parameters())}")
    print(f"VmHWM_kB={_proc_status_kb('VmHWM')}")


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd in a fresh process; return (wall s incl. start-up, its peak RSS in MB, output).

    The child must print ``VmHWM_kB=N`` (HWM_WRAPPER or the helper modes do).
    """
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    peak_kb = int(re.findall(r"VmHWM_kB=(\d+)", proc.stdout)[-1])
    return wall, peak_kb / 1024, proc.stdout


def median_time(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; medians are reported")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"rss": child_rss, "meta": child_meta}[args.child[0]](args.child[1])
        return 0

    t0 = time.perf_counter()
    os.environ.update(CHILD_ENV)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pruning.analysis import ModelAnalyzer
    from pruning.source.builtin import resolve

    transformers.utils.logging.disable_progress_bar()
    smol = resolve("smollm2-135m")
    errors: list[str] = []
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        rows.append((name, value, target, "" if ok is None else ("PASS" if ok else "MISS")))

    def check(what: str, got: int, want: int) -> None:
        if got != want:
            errors.append(f"{what}: {got:,} parameters, expected {want:,}")

    def load_and_count() -> int:
        model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
        return sum(p.numel() for p in model.parameters())

    # 1. in-process: full load vs header analysis
    t_load, n_load = median_time(load_and_count, args.runs)
    t_hdr, report = median_time(lambda: ModelAnalyzer(smol).analyze(), args.runs)
    check("SmolLM2 from_pretrained", n_load, SMOL_PARAMS)
    check("SmolLM2 ModelAnalyzer", report["total_params"], SMOL_PARAMS)
    row("SmolLM2 from_pretrained + numel", f"{t_load * 1000:.1f} ms")
    row("SmolLM2 ModelAnalyzer.analyze()", f"{t_hdr * 1000:.2f} ms")
    row("  speed-up (load / analyze)", f"{t_load / t_hdr:.0f}x", ">= 20x", t_load / t_hdr >= 20)

    # 2. memory added by header analysis, imports excluded
    deltas = []
    for _ in range(args.runs):
        out = run_child([sys.executable, __file__, "--child", "rss", smol])[2]
        result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        check("SmolLM2 ModelAnalyzer (subprocess)", result["total"], SMOL_PARAMS)
        deltas.append(result["delta_mb"])
    rss = statistics.median(deltas)
    row("SmolLM2 analysis RSS over imports", f"{rss:.1f} MB", "< 50 MB", rss < 50)

    # 3. Llama-2-7B from config.json alone: `python -m pruning.analysis` in a fresh interpreter
    cli = [sys.executable, "-c", HWM_WRAPPER, "pruning.analysis", "--model_path", str(LLAMA_DIR)]
    walls, peaks = [], []
    for _ in range(args.runs):
        wall, peak, out = run_child(cli)
        if f"{LLAMA_PARAMS:,}" not in out:
            errors.append(f"Llama-2-7B CLI output lacks {LLAMA_PARAMS:,}:\n{out}")
        walls.append(wall)
        peaks.append(peak)
    wall, peak = statistics.median(walls), statistics.median(peaks)
    row("Llama-2-7B CLI wall (config only)", f"{wall:.2f} s", "< 3 s", wall < 3)
    row("Llama-2-7B CLI peak RSS", f"{peak:.0f} MB", "< 600 MB", peak < 600)

    # reference: transformers meta-device build of the same config
    walls, peaks = [], []
    for _ in range(args.runs):
        wall, peak, out = run_child([sys.executable, __file__, "--child", "meta", str(LLAMA_DIR)])
        check("Llama-2-7B meta build", int(re.findall(r"total=(\d+)", out)[-1]), LLAMA_PARAMS)
        walls.append(wall)
        peaks.append(peak)
    meta = f"{statistics.median(walls):.2f} s, {statistics.median(peaks):.0f} MB"
    row("ref: Llama-2-7B meta build (transformers)", meta)

    print(
        f"\nModel analysis benchmark: median of {args.runs} runs "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs)"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in [("figure", "value", "target", ""), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    print(f"parameter counts: SmolLM2 {n_load:,} (load) / {report['total_params']:,} (headers)")
    print(f"total benchmark time: {time.perf_counter() - t0:.1f} s")
    for err in errors:
        print(f"ERROR: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
