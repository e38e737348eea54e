"""Load and validate the JSON reports this package writes: their schemas, then their sums.

Every report carries ``report_type`` (which schema applies) and ``schema_version``. Validation is the
schema (``pruning/schemas/``) followed by the invariants of ``pruning.reports.checks``; both name the
first failing JSON path.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from pruning.errors import UserError
from pruning.reports.checks import first_failure
from pruning.storage.fs import MAX_JSON_BYTES, read_regular_file
from pruning.storage.json_files import write_json_atomic

SCHEMA_FILES: dict[str, str] = {
    "model_analysis": "model_analysis.schema.json",
    "model_comparison": "model_comparison.schema.json",
    "pruning_plan": "pruning_plan.schema.json",
    "run_record": "run_record.schema.json",
    "perplexity": "perplexity.schema.json",
}


class ReportValidationError(ValueError):
    """A report does not match its schema; ``json_path`` names the failing place (``$.layers[3].total``)."""

    def __init__(self, json_path: str, message: str, source: str = "report") -> None:
        super().__init__(f"{source}: {json_path}: {message}")
        self.json_path = json_path


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped as ``pruning/schemas/<name>``."""
    text = resources.files("pruning.schemas").joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def validate(report: Any, report_type: str | None = None, source: str = "report") -> None:
    """Raise ReportValidationError naming the first failing JSON path (the deepest, most specific one)."""
    if not isinstance(report, dict):
        raise ReportValidationError("$", "a report must be a JSON object", source)
    report_type = report_type or report.get("report_type")
    if report_type not in SCHEMA_FILES:
        raise ReportValidationError(
            "$.report_type", f"expected one of {sorted(SCHEMA_FILES)}, got {report_type!r}", source
        )
    schema = load_schema(SCHEMA_FILES[report_type])
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(report))
    if error is not None:
        raise ReportValidationError(error.json_path, error.message, source)
    failure = first_failure(report)
    if failure is not None:
        raise ReportValidationError(*failure, source)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report from disk and validate it; the error names the file and the failing JSON path.

    A file that cannot be read as JSON at all (missing, a directory, unreadable, nested beyond what a
    parser should follow) is a UserError; JSON that is not a valid report is a ReportValidationError.
    """
    path = Path(path)
    data = read_regular_file(path, what="JSON report", limit=MAX_JSON_BYTES)
    try:
        report = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ReportValidationError("$", f"not valid JSON ({e})", str(path)) from e
    except RecursionError as e:  # a limit of the parser, like the next one: exit 2, not "invalid"
        raise UserError(f"{path}: JSON nested too deeply to be a report") from e
    except json.JSONDecodeError as e:
        raise ReportValidationError("$", f"not valid JSON ({e})", str(path)) from e
    except ValueError as e:  # int() refuses a number of more than 4300 digits
        raise UserError(f"{path}: holds a number too long to be read ({str(e)[:80]}...)") from e
    validate(report, source=str(path))
    return report


def save(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate, then write atomically: an invalid report never reaches the disk."""
    validate(report, source=str(path))
    return write_json_atomic(path, report)
