"""Peak memory and wall time of the whole pipeline on random Llama-shaped bf16 models.

    python benchmarks/memory.py [--shape 1b|7b|8b|13b] [--runs N] [--modes whole_model,layerwise,streamed]
        [--device cpu|cuda|cuda:N] [--set KEY=VALUE ...] [--tokenizer DIR] [--tmp-dir DIR]

Writes a random-initialised model of the chosen shapes shard by shard (never whole in memory) into a
temporary directory (under ``--tmp-dir``, default the system's, ``$TMPDIR``; removed at the end, failed
runs included), with SmolLM2's tokenizer, then runs ``run_global_pruning.py`` on it with the default
config but the activation criterion, selection ``plan`` and 8 calibration windows of 64 tokens from one
text (20%, the config's hooks, save; ``--set`` overrides any of it, e.g. ``--set pruning.importance=obs_fisher
--set compensation.method=refit --set compensation.selection=obs``) once per mode and run, each in a
fresh process, on ``--device`` (``model.device_map``), and prints the medians side by side: peak
resident memory (the run's own ``VmHWM``, ``peak_rss_mb`` in run.json), its ratio to the weight bytes,
peak GPU memory (``peak_gpu_mb``, when the runs recorded one: torch saw a GPU), whether the run streamed
(``model.streaming: auto`` streams a model whose weights exceed 70% of the available RAM), and time per
stage. Modes: ``whole_model`` and ``layerwise`` are the calibration engines (streaming left to
``auto``); ``streamed`` is layerwise with ``model.streaming: always``. The plans of all runs must be
equal; a difference exits 1. Missed targets are printed, not fatal: a streamed run at most 8 GiB, an
in-memory run at most 1.2x the weight bytes.

run.json reads ``VmHWM``, not ``ru_maxrss`` (which Linux carries over across ``exec`` from the
forking process); the benchmark process never imports torch anyway, so either is the child's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, intermediate, layers, heads, kv heads (vocabulary: SmolLM2's tokenizer, 49,152)
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
    # Llama-3-8B's decoder; its own vocabulary is 128,256, but the tokenizer here is SmolLM2's, whose
    # 49,152 ids the embedding and head keep: 1.21 GiB of bf16 less than the real one, in parts never pruned
    "8b": (4096, 14336, 32, 32, 8),
    "13b": (5120, 13824, 40, 40, 40),  # Llama-2-13B
}
SHARD_BYTES = 2 * 10**9
TARGET_RATIO = 1.2  # in-memory path: peak RSS at most 1.2x the weight bytes (issue target)
TARGET_STREAMED = 8 * 2**30  # streamed path: peak RSS at most 8 GiB, whatever the model's size
ENV = {
    **os.environ,
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def write_random_model(directory: Path, shape: str, tokenizer_dir: Path) -> None:
    """Child process: config, tokenizer and bf16 safetensors shards of random weights, tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=49152,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total, index = 0, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, index
        if shard:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

    for name, param in skeleton.named_parameters():
        if "norm" in name:
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(param.shape, generator=gen) * 0.02).to(torch.bfloat16)
        size = tensor.numel() * 2
        if shard_bytes + size > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def write_random_model_apart(model_dir: Path, shape: str, tokenizer_dir: str | None = None) -> None:
    """``write_random_model`` in a child process (its memory is not the caller's), with the built-in
    SmolLM2's tokenizer unless one is given."""
    if tokenizer_dir is None:
        resolve = "from pruning.source.builtin import resolve; print(resolve('smollm2-135m'))"
        found = subprocess.run(
            [sys.executable, "-c", resolve], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True
        )
        tokenizer_dir = found.stdout.strip().splitlines()[-1]
    subprocess.run(
        [sys.executable, __file__, "--child-write", str(model_dir), shape, tokenizer_dir], env=ENV, check=True
    )


def run_pipeline(model_dir: Path, out: Path, mode: str, extra: list[str], device: str = "cpu") -> dict:
    """One run in a fresh process. The settings below make the runs of all shapes comparable; ``extra``
    comes last, so that any of them can be overridden."""
    engine = "layerwise" if mode == "streamed" else mode
    streaming = "always" if mode == "streamed" else "auto"
    args = [
        sys.executable,
        str(ROOT / "run_global_pruning.py"),
        "--config",
        str(ROOT / "configs/smollm2_0.2.yaml"),
        "--set",
        f"model.path={model_dir}",
        "--set",
        "model.dtype=bfloat16",
        "--set",
        "pruning.importance=activation",  # what benchmarks/results/memory.md measures; --set obs_fisher
        "--set",
        "compensation.selection=plan",
        "--set",  # one text: the default mix's 5% shares would round to no window of 8
        "calibration.sources=[{source: data/wikitext-2-raw/wiki.valid.raw, weight: 1}]",
        "--set",
        "calibration.num_samples=8",
        "--set",
        "calibration.seq_len=64",
        "--set",
        f"calibration.engine={engine}",
        "--set",
        f"model.streaming={streaming}",
        "--set",
        f"model.device_map={device}",
        *[arg for setting in extra for arg in ("--set", setting)],
        "--output-dir",
        str(out),
    ]
    result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"pipeline failed ({mode}):\n{result.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    record["plan"] = json.loads((out / "plan.json").read_text())
    return record


def weight_bytes(model_dir: Path) -> int:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="1b")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--modes", default="whole_model,layerwise,streamed")
    parser.add_argument(
        "--device", default="cpu", help="model.device_map of the runs: cpu (default), cuda or cuda:N"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the built-in SmolLM2's)")
    parser.add_argument(
        "--tmp-dir", type=Path, help="where the random model and the runs' outputs go (default: $TMPDIR)"
    )
    parser.add_argument(
        "--child-write", nargs=3, metavar=("DIR", "SHAPE", "TOKENIZER_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child_write:
        directory, shape, tokenizer_dir = args.child_write
        write_random_model(Path(directory), shape, Path(tokenizer_dir))
        return 0

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", args.device):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if args.tmp_dir:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pruning-memory-", dir=args.tmp_dir) as tmp:
        model_dir = Path(tmp) / f"random-llama-{args.shape}"
        write_random_model_apart(model_dir, args.shape, args.tokenizer)
        weights = weight_bytes(model_dir)
        print(f"random Llama-shaped {args.shape} model, bf16: {weights / 2**30:.2f} GiB of weights")
        print(f"device: {args.device}; config overrides: {' '.join(args.set) or 'none'}")
        results: dict[str, list[dict]] = {}
        for run in range(args.runs):
            for mode in args.modes.split(","):
                out = Path(tmp) / f"out-{mode}-{run}"
                results.setdefault(mode, []).append(run_pipeline(model_dir, out, mode, args.set, args.device))
                shutil.rmtree(out)
        plans = [r["plan"]["layers"] for records in results.values() for r in records]
        same_plan = all(plan == plans[0] for plan in plans)
        # run.json has peak_gpu_mb whenever the run's torch saw a GPU (about 0 when the run left it unused)
        gpu_seen = any(r.get("peak_gpu_mb") is not None for records in results.values() for r in records)
        gpu_header = f" {'peak GPU':>12}" if gpu_seen else ""
        header = (
            f"{'mode':<12} {'peak RSS':>12}{gpu_header} {'x weights':>10} {'streamed':>9}  time per stage"
        )
        print(f"{header} (medians of {args.runs})")
        for mode, records in results.items():
            peak = statistics.median(r["peak_rss_mb"] for r in records) * 2**20
            stages = {
                k: statistics.median(r["timings_s"][k] for r in records) for k in records[0]["timings_s"]
            }
            ratio = peak / weights
            streamed = records[0].get("placement", {}).get("streamed", False)
            if streamed:
                verdict = "PASS" if peak <= TARGET_STREAMED else "MISS"
                target = f"[{verdict} <= {TARGET_STREAMED / 2**30:.0f} GiB]"
            else:
                verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
                target = f"[{verdict} <= {TARGET_RATIO}x]"
            timing = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
            total = sum(stages.values())
            gpu = ""
            if gpu_seen:
                gpu_peaks = [r["peak_gpu_mb"] for r in records if r.get("peak_gpu_mb") is not None]
                gpu = f" {statistics.median(gpu_peaks) / 2**10:>8.2f} GiB" if gpu_peaks else f" {'-':>12}"
            print(
                f"{mode:<12} {peak / 2**30:>8.2f} GiB{gpu} {ratio:>9.2f}x {str(streamed):>9}  "
                f"{timing}; total {total:.0f} s  {target}"
            )
        print(f"same plan from every run: {same_plan}")
        return 0 if same_plan else 1


if __name__ == "__main__":
    raise SystemExit(main())
