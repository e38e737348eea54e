"""Where a run writes, and the checks that keep it from clobbering anything it should not."""

from __future__ import annotations

import shutil
from pathlib import Path

from pruning.errors import UserError

CHECKPOINT_SUBDIR = "models"
RUN_RECORD = "run.json"
PLAN_FILE = "plan.json"
# What a previous run leaves; only a directory holding nothing else may be cleared by overwrite: true.
_RUN_ARTIFACTS = {CHECKPOINT_SUBDIR, "analysis", RUN_RECORD, PLAN_FILE}


def check_output_dir(output_dir: Path, overwrite: bool, model_path: str) -> None:
    """Refuse a non-empty output dir (unless overwrite) and any output inside the source model."""
    model_dir = Path(model_path)
    if model_dir.exists() and (
        _is_within(output_dir.resolve(), model_dir.resolve())
        or _is_within(model_dir.resolve(), output_dir.resolve())
    ):
        raise UserError(
            f"output.dir {output_dir} and the source model {model_path} overlap; "
            "the source is never modified, choose another output.dir"
        )
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"output.dir {output_dir} exists and is not a directory")
    entries = {p.name for p in output_dir.iterdir()}
    if not entries:
        return
    if not overwrite:
        raise UserError(
            f"output.dir {output_dir} exists and is not empty; set output.overwrite: true "
            "(or --set output.overwrite=true) or choose another directory"
        )
    strangers = sorted(e for e in entries if e not in _RUN_ARTIFACTS and not _is_leftover(e))
    if strangers:
        raise UserError(
            f"output.dir {output_dir} holds files that are not from a pruning run "
            f"({', '.join(strangers[:5])}); refusing to overwrite it"
        )


def clear_previous_run(output_dir: Path) -> None:
    """Remove a previous run's outputs and its temporary leftovers, and nothing else."""
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            if entry.name in _RUN_ARTIFACTS or _is_leftover(entry.name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _is_leftover(name: str) -> bool:
    """Temporary names our atomic writers use (``.models.partial-xxxx``, ``.run.json.xxxx.tmp``)."""
    return name.startswith(".") and (".partial-" in name or name.endswith(".tmp"))


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents
