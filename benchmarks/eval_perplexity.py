"""Perplexity of the dense model and of pruned checkpoints, with the protocol printed beside the numbers.

    python benchmarks/eval_perplexity.py results/smollm2_0.2/models [more pruned dirs ...]
        [--base smollm2-135m] [--text data/wikitext-2-raw/wiki.test.raw] [--seq-len 512] [--max-tokens 8192]

Protocol: WikiText-2 raw test split read whole as one string, tokenised with the base model's tokenizer
(no special tokens), cut into consecutive non-overlapping windows of ``seq-len`` tokens (no context
carried across windows, stride = seq-len), the first ``max-tokens`` tokens, float32, mean next-token NLL.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning import load_pruned_model
from pruning.calibration.perplexity import evaluation_windows, perplexity
from pruning.source.builtin import resolve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pruned", nargs="*", help="pruned checkpoint directories")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--text", default="data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = resolve(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    windows = evaluation_windows(args.text, tokenizer, args.seq_len, max_tokens=args.max_tokens)
    print(
        f"protocol: {args.text}, tokenizer of {args.base}, "
        f"{windows.shape[0]} windows x {args.seq_len} tokens (stride {args.seq_len}, "
        f"first {windows.numel():,} tokens), float32"
    )
    models = [("dense " + args.base, lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))]
    models += [(path, lambda path=path: load_pruned_model(path)) for path in args.pruned]
    print(f"{'model':<44} {'parameters':>13} {'perplexity':>11} {'eval s':>7}")
    for name, load in models:
        model = load()
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=args.batch_size)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<44} {params:>13,} {ppl:>11.2f} {time.perf_counter() - start:>7.1f}")


if __name__ == "__main__":
    main()
