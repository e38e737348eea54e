"""Atomic JSON writing: a report on disk is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.storage.fs import MAX_JSON_BYTES, read_text_file_bounded, write_bytes_atomic


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file that must hold an object; whatever is wrong with it is the user's error, named."""
    path = Path(path)
    data = parse_json(read_text_file_bounded(path, what="JSON file", limit=MAX_JSON_BYTES), path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def parse_json(text: str, source: str | os.PathLike[str]) -> Any:
    """``json.loads`` whose every refusal is one line naming ``source``: bad syntax, nesting too deep
    for the parser, an integer of more digits than Python converts (4300)."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise UserError(f"{source}: not valid JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, and int() refusing a 5000-digit number
        raise UserError(f"{source}: not valid JSON ({_short(str(e))})") from e


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically (``pruning.storage.fs.write_bytes_atomic``)."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))
