"""``python -m pruning.export.cli CHECKPOINT OUT.gguf``: write a saved checkpoint as GGUF for llama.cpp."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pruning.cli_support import run_cli, setup_logging
from pruning.export.gguf import QTYPES, export_gguf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruning.export.cli",
        description="Write a checkpoint directory (pruned by this package, or stock) as one GGUF file.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (config.json, safetensors, tokenizer)")
    parser.add_argument(
        "out", help="the .gguf file to write: a new name (nothing there, not even a link, is replaced)"
    )
    parser.add_argument("--dtype", choices=sorted(QTYPES), default="f16", help="2-D weights (default f16)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        export_gguf(args.checkpoint, args.out, dtype=args.dtype)
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
