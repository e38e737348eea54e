"""Atomic JSON writing: a report on disk is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.storage.fs import write_bytes_atomic


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file that must hold an object; whatever is wrong with it is the user's error, named."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from e
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically (``pruning.storage.fs.write_bytes_atomic``)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the JSON")
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))
