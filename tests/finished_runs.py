"""Finished runs as the tool leaves them, for the output-directory tests."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import yaml

from pruning import reports
from pruning.config import load_config
from pruning.hooks.context import PipelineContext
from pruning.pipeline.run_record import build_run_record
from pruning.rundir.staging import StagedRun
from pruning.rundir.target import build_manifest

RUN_FILES = {"models/model.safetensors": b"weights", "models/config.json": b"{}", "plan.json": b"{}"}


def finish_run(directory: Path, files: dict[str, bytes] | None = None, tmp: Path | None = None) -> Path:
    """A directory as a finished run leaves it: its files plus a valid run.json listing them."""
    for rel, data in (files or RUN_FILES).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    config_file = (tmp or directory.parent) / "cfg.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"path": "m"}, "pruning": {"ratio": 0.2}}))
    context = PipelineContext(config=load_config(config_file), output_dir=directory, model_path="m")
    context.params_before, context.params_after = 100, 80
    context.layer_params_before, context.layer_params_after = 90, 70
    record = build_run_record(context, datetime.now(timezone.utc), directory, build_manifest(directory))
    reports.save(record, directory / "run.json")
    return directory


def staged(target: Path, overwrite: bool = True) -> StagedRun:
    return StagedRun(target, overwrite, "/nonexistent/source")


def publish_new_run(target: Path, content: bytes = b"new weights", overwrite: bool = True) -> None:
    with staged(target, overwrite) as run:
        finish_run(run.staging, {"models/model.safetensors": content}, tmp=target.parent)
        run.publish()


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))
