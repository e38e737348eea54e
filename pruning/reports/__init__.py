"""The JSON reports this package writes: their schemas (``pruning/schemas/``), then their sums.

``from pruning import reports`` then ``reports.load(path)`` / ``reports.save(report, path)`` /
``reports.validate(report)``; the invariants beyond the schemas are in ``pruning.reports.checks``.
"""

from pruning.reports.validation import (
    SCHEMA_FILES,
    ReportValidationError,
    load,
    load_schema,
    save,
    validate,
)

__all__ = ["SCHEMA_FILES", "ReportValidationError", "load", "load_schema", "save", "validate"]
