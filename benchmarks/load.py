"""Loading a model into memory: read (what a run does) against mapped (``from_pretrained``), side by side.

    python benchmarks/load.py [--model DIR | --shape 1b] [--runs 3]

Each run is a fresh process that imports everything and loads once to warm caches, then times a
second load and one read of every weight (what scoring does first), and reports the process's peak
resident memory (``VmHWM``). Reading costs page faults and a copy out of the page cache that a mapping
defers to the first touch, so the fair comparison is "load plus first touch". A run reads rather than
maps so that a source truncated mid-run is one line, not SIGBUS (docs/reliability.md). Without
``--model``, a random Llama-shaped model is written as ``benchmarks/memory.py`` writes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, sys, time
import torch
from transformers import AutoModelForCausalLM
from pruning.config import ModelConfig
from pruning.source.loading import load_model_and_tokenizer

mode, path = sys.argv[1], sys.argv[2]

def load():
    if mode == "read":
        config = ModelConfig(path=path, dtype="bfloat16", device_map="cpu")
        return load_model_and_tokenizer(config, path).model
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, use_safetensors=True).eval()

warm = load()
del warm
gc.collect()
start = time.perf_counter()
model = load()
loaded = time.perf_counter() - start
with torch.no_grad():
    for p in model.parameters():
        p.float().sum()
touched = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"load_s": loaded, "touched_s": touched, "peak_gib": peak / 2**20}))
"""


def measure(mode: str, model_dir: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(model_dir)], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"{mode} load failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(model_dir: Path, runs: int) -> None:
    results: dict[str, list[dict[str, float]]] = {"read": [], "mapped": []}
    for _ in range(runs):
        for mode, measured in results.items():  # interleaved, so drift hits both alike
            measured.append(measure(mode, model_dir))
    print(f"{model_dir.name}, median of {runs} (warm page cache)")
    print(f"{'mode':<8} {'load':>8} {'load + first touch':>20} {'peak RSS':>10}")
    medians = {}
    for mode, measured in results.items():
        medians[mode] = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
        m = medians[mode]
        print(f"{mode:<8} {m['load_s']:>7.2f}s {m['touched_s']:>19.2f}s {m['peak_gib']:>8.2f} GiB")
    read, mapped = medians["read"], medians["mapped"]
    print(
        f"read / mapped: load + first touch {read['touched_s'] / mapped['touched_s']:.2f}x, "
        f"peak RSS {read['peak_gib'] / mapped['peak_gib']:.2f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a local safetensors model directory")
    parser.add_argument("--shape", default="1b", help="random model shape when no --model (memory.py's)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.model:
        report(args.model, args.runs)
        return 0
    from memory import write_random_model_apart  # noqa: PLC0415 - a sibling script, run from here

    with tempfile.TemporaryDirectory(prefix="pruning-load-") as tmp:
        model_dir = Path(tmp) / f"random-llama-{args.shape}"
        write_random_model_apart(model_dir, args.shape)
        report(model_dir, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
