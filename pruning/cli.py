"""``python run_global_pruning.py --config FILE`` / ``run-global-pruning``: the pruning job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from pruning.cli_support import run_cli, setup_logging
from pruning.config import load_config
from pruning.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_global_pruning.py",
        description="Prune a decoder LLM globally to a target share of parameters.",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--output-dir", help="override output.dir")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key; values are YAML (--set pruning.ratio=0.3)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and show what would run; load no weights"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.output_dir is not None and not args.output_dir.strip():
        raise UserError("--output-dir: must not be empty")
    config = load_config(args.config, args.overrides)
    if args.output_dir is not None:  # a plain string, not YAML: "2024-05-01" or "a #1" stay as typed
        config = replace(config, output=replace(config.output, dir=args.output_dir))
    from pruning.pipeline.run import prepare, run_pipeline

    if args.dry_run:
        from pruning.pipeline.dry_run import describe_run

        context, hooks = prepare(config, dry_run=True)
        print(describe_run(context, [h.name for h in hooks.hooks]))
        return 0
    run_pipeline(config)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
