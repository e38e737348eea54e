"""``python -m pruning.analysis`` / ``model-analysis``: analyse one model, or compare two."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pruning import reports
from pruning.analysis.analyzer import ModelAnalyzer
from pruning.analysis.comparator import ModelComparator
from pruning.analysis.text_report import LABELS
from pruning.cli_support import run_cli, setup_logging
from pruning.errors import UserError
from pruning.storage.fs import replace_problem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruning.analysis",
        description="Count a model's parameters per layer, or compare an original and a pruned model.",
    )
    parser.add_argument("--model_path", help="model directory, hub id, .safetensors, .gguf (required)")
    parser.add_argument("--model_name", help="name used in the report (default: the path's last part)")
    parser.add_argument("--save_json", help="write the analysis (or, with --compare_with, the comparison)")
    parser.add_argument("--compare_with", help="a second (pruned) model to compare against --model_path")
    parser.add_argument("--compare_name", help="name of the --compare_with model in the report")
    parser.add_argument("--verbose", action="store_true", help="show per-layer details")
    parser.add_argument(
        "--lang",
        choices=sorted(LABELS),
        default=default_lang(),
        help="report language (default: from the locale, zh when LANG is zh_*, else en)",
    )
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow unpickling a .bin/.pt file (runs code in it)"
    )
    parser.add_argument(
        "--validate",
        metavar="FILE",
        help="validate a JSON report (schema and sums); exit 0 if valid, 1 if not, 2 if not readable",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.validate:
        return run_cli(lambda: _validate(args.validate), debug=args.debug)
    if not args.model_path:
        parser.error("--model_path is required (or use --validate FILE)")
    return run_cli(lambda: _analyse(args), debug=args.debug)


def default_lang(environ: Mapping[str, str] | None = None) -> str:
    """``zh`` when the locale is Chinese (as the original specification prints), else ``en``.

    The first of LC_ALL, LC_MESSAGES, LANG that is set decides, as in POSIX.
    """
    environ = os.environ if environ is None else environ
    for key in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(key)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def _validate(path: str) -> int:
    try:
        report = reports.load(path)
    except reports.ReportValidationError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    print(f"valid: {path} ({report['report_type']}, schema version {report['schema_version']})")
    return 0


def _analyse(args: argparse.Namespace) -> int:
    problem = replace_problem(Path(args.save_json)) if args.save_json else None
    if problem is not None:  # said before the analysis runs, not after
        raise UserError(f"--save_json {args.save_json}: {problem}")
    original = ModelAnalyzer(args.model_path, args.model_name, trust_pickle=args.trust_pickle)
    if not args.compare_with:
        original.print_report(verbose=args.verbose, lang=args.lang)
        if args.save_json:
            print(f"saved: {_save(original, args.save_json)}")
        return 0
    pruned = ModelAnalyzer(args.compare_with, args.compare_name, trust_pickle=args.trust_pickle)
    comparator = ModelComparator(original.analyze(), pruned.analyze(), original.model_name, pruned.model_name)
    comparator.print_report(verbose=args.verbose, lang=args.lang)
    if args.save_json:
        print(f"saved: {_save(comparator, args.save_json)}")
    return 0


def _save(report_maker: ModelAnalyzer | ModelComparator, path: str) -> str:
    """Write the JSON; a report the user's inputs make invalid (a "pruned" model larger than the
    original has a negative reduction) is refused in one line, and nothing is written."""
    try:
        return str(report_maker.save_report(path))
    except reports.ReportValidationError as e:
        raise UserError(f"not saved: {e}") from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
