"""The GGUF export checked by llama.cpp itself: next-token choices and perplexity against transformers.

    python benchmarks/gguf_check.py [--pruned results/smollm2_0.2/models] [--dtypes f32,f16,q8_0]

Needs llama-cpp-python (``make llamacpp`` builds it from source: 18.5 minutes on 2 cores, so CI does not
run this; ``make gguf-check`` does). For the dense built-in SmolLM2-135M and each pruned checkpoint,
every dtype is exported with ``pruning.export.gguf`` and compared with the same checkpoint in
transformers (float32, ``pruning.checkpoint.save.load_pruned_model``):

- next tokens: a fixed prompt set, 32 prompts of 64 tokens cut from WikiText-2 test at fixed offsets;
  the greedy choice after every prompt position (2,048 choices) and after each whole prompt;
- perplexity: WikiText-2 test, first 4,096 tokens in 512-token windows (the README's short protocol);
- the GGUF's tokenizer against transformers' on the prompts' text.

Token ids go to both engines directly, so the networks are compared, not the tokenizers. Tolerances
(``TOLERANCE``, ``TOKEN_AGREEMENT``): perplexity within 0.1% for f32 weights, 1% for f16/bf16, 3% for
q8_0; per-position choices agreeing 99.9% / 99% / 98% (bf16) / 90% (q8_0), every last choice for f32. Writes
``benchmarks/results/gguf_check.md`` and ``.json``; exits 1 when a check misses its tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning import llamacpp  # noqa: E402
from pruning.calibration.perplexity import evaluation_windows, perplexity  # noqa: E402
from pruning.checkpoint.load import load_pruned_model  # noqa: E402
from pruning.export.gguf import export_gguf  # noqa: E402
from pruning.source.builtin import resolve  # noqa: E402

logger = logging.getLogger("gguf_check")
TEXT = ROOT / "data" / "wikitext-2-raw" / "wiki.test.raw"
TOLERANCE = {"f32": 0.001, "f16": 0.01, "bf16": 0.01, "q8_0": 0.03}  # relative perplexity difference
PROMPTS, PROMPT_LEN, PPL_TOKENS, WINDOW = 32, 64, 4096, 512
# share of the 2,048 per-position greedy choices that must agree: rounding weights moves near-ties
TOKEN_AGREEMENT = {"f32": 0.999, "f16": 0.99, "bf16": 0.98, "q8_0": 0.9}


def prompt_set(tokenizer: Any) -> tuple[torch.Tensor, list[str]]:
    """32 windows of 64 tokens at fixed offsets in WikiText-2 test, and their text."""
    ids = evaluation_windows(str(TEXT), tokenizer, PROMPT_LEN).view(-1)
    stride = ids.numel() // PROMPTS // PROMPT_LEN * PROMPT_LEN
    prompts = torch.stack([ids[i * stride : i * stride + PROMPT_LEN] for i in range(PROMPTS)])
    return prompts, [tokenizer.decode(p) for p in prompts]


def check_one(label: str, checkpoint: Path, dtype: str, workdir: Path, threads: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    prompts, texts = prompt_set(tokenizer)
    windows = evaluation_windows(str(TEXT), tokenizer, WINDOW, PPL_TOKENS)
    model = load_pruned_model(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(input_ids=prompts, use_cache=False).logits
    hf_ppl = perplexity(model, windows, batch_size=4)
    del model

    started = time.perf_counter()
    gguf_file = export_gguf(checkpoint, workdir / f"{label}-{dtype}.gguf", dtype=dtype)
    export_s = time.perf_counter() - started
    runner = llamacpp.LlamaCppModel(gguf_file, n_ctx=WINDOW, threads=threads)
    try:
        cpp_choice = np.stack([runner.logits(p.tolist()).argmax(-1) for p in prompts])
        cpp_ppl = runner.perplexity(windows.numpy())
        same_tokens = sum(runner.tokenize(t) == tokenizer.encode(t, add_special_tokens=False) for t in texts)
    finally:
        runner.close()
    hf_choice = hf_logits.argmax(-1).numpy()
    row = {
        "model": label,
        "dtype": dtype,
        "gguf_mb": round(gguf_file.stat().st_size / 2**20, 1),
        "export_s": round(export_s, 1),
        "positions_agree": float((cpp_choice == hf_choice).mean()),
        "last_agree": int((cpp_choice[:, -1] == hf_choice[:, -1]).sum()),
        "prompts": PROMPTS,
        "ppl_transformers": hf_ppl,
        "ppl_llamacpp": cpp_ppl,
        "ppl_rel_diff": abs(cpp_ppl - hf_ppl) / hf_ppl,
        "tokenizer_same": same_tokens,
    }
    row["ok"] = verdict(row)
    logger.info("%s", row)
    gguf_file.unlink()
    return row


def verdict(row: dict[str, Any]) -> bool:
    """Within tolerance: perplexity, per-position choices, every last choice for f32, the tokenizer."""
    dtype = row["dtype"]
    return bool(
        row["ppl_rel_diff"] <= TOLERANCE[dtype]
        and row["positions_agree"] >= TOKEN_AGREEMENT[dtype]
        and (dtype != "f32" or row["last_agree"] == row["prompts"])
        and row["tokenizer_same"] == row["prompts"]
    )


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# GGUF export checked by llama.cpp",
        "",
        f"`benchmarks/gguf_check.py`: each model exported by `pruning.export.gguf` and run by llama.cpp "
        f"(llama-cpp-python {_version()}) on the CPU, against the same checkpoint in transformers (float32). "
        f"Next tokens: greedy choice at every position of {PROMPTS} prompts of {PROMPT_LEN} tokens from "
        f"WikiText-2 test, and after each whole prompt. Perplexity: WikiText-2 test, first {PPL_TOKENS:,} "
        f"tokens in {WINDOW}-token windows. Tolerance on perplexity: "
        + ", ".join(f"{k} {v:.1%}" for k, v in TOLERANCE.items())
        + "; on per-position choices: "
        + ", ".join(f"{k} {v:.1%}" for k, v in TOKEN_AGREEMENT.items())
        + " (f32: every last choice too).",
        "",
        "| model | weights | GGUF MB | positions agreeing | last token agreeing | ppl transformers "
        "| ppl llama.cpp | difference | tokenizer same | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "yes" if r["ok"] else "**no**"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['gguf_mb']} | {r['positions_agree']:.2%} | "
            f"{r['last_agree']}/{r['prompts']} | {r['ppl_transformers']:.3f} | {r['ppl_llamacpp']:.3f} | "
            f"{r['ppl_rel_diff']:.3%} | {r['tokenizer_same']}/{r['prompts']} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", default="smollm2-135m", help="dense checkpoint (default: built-in)")
    parser.add_argument("--pruned", action="append", default=None, help="pruned checkpoint (repeatable)")
    parser.add_argument("--dtypes", default="f32,f16,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_check.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if not llamacpp.available():
        logger.error("llama-cpp-python is not installed: run make llamacpp first")
        return 2
    models = [("dense", Path(resolve(args.dense)))]
    for path in args.pruned or [str(ROOT / "results" / "smollm2_0.2" / "models")]:
        models.append((Path(path).parent.name or Path(path).name, Path(path)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkpoint in models:
            for dtype in args.dtypes.split(","):
                rows.append(check_one(label, checkpoint, dtype, Path(tmp), args.threads))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(render(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
