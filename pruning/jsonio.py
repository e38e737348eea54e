"""Atomic JSON writing: a report on disk is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.fsutil import DISK_ERRNOS, current_umask, disk_errno


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
    """Write ``data`` as indented UTF-8 JSON to a temporary file beside ``path``, then rename it.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"{path}: is a directory; give a file name for the JSON")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # read-only, not a directory on the way, a name too long: the path is wrong
        code = disk_errno(e)
        reason = DISK_ERRNOS[code] if code is not None else (e.strerror or str(e)).lower()
        raise UserError(f"{path}: cannot write here: {reason}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
