"""Built-in texts of kinds other than encyclopedia prose, from what every Python installation has.

A model pruned on Wikipedia prose can keep Wikipedia and lose the rest, so the tool needs text of
other kinds to calibrate on and, held out, to evaluate on. No model hub or dataset server is
reachable on the machines this tool is built for, but Python's standard library is everywhere:

- ``python-code``: the library's own source (``*.py``, tests and IDLE excluded);
- ``python-docs``: the Python reference manual's prose (the ``pydoc_data.topics`` help texts).

Each comes in two disjoint parts: ``-heldout`` (about 10% of the files, 25% of the help topics, chosen
by a hash of their names) for evaluation only, and the rest for calibration (less any paragraph the
held-out part has: help topics repeat each other's sections). A source string
``builtin:python-code`` names the calibration part, ``builtin:python-code-heldout`` the held-out one.
The texts depend on the Python version (recorded with every perplexity), not on the machine.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pruning.errors import UserError

PREFIX = "builtin:"
HELDOUT = "-heldout"
_CODE_HELDOUT_SHARE = 0.10
_DOCS_HELDOUT_SHARE = 0.25
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def _rank(name: str) -> float:
    """A stable number in [0, 1) from a name: the same split on every machine."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code(heldout: bool) -> str:
    root = _stdlib()
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)
    )
    chosen = [f for f in files if (_rank(f) < _CODE_HELDOUT_SHARE) == heldout]
    chosen.sort(key=_rank)  # mixed domains from the first token on, not one package after another
    return "\n\n".join((root / f).read_text(encoding="utf-8", errors="replace") for f in chosen)


def _docs(heldout: bool) -> str:
    path = _stdlib() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise UserError(f"builtin:python-docs needs {path}, which this Python installation lacks")
    module = ast.parse(path.read_text(encoding="utf-8"))
    topics = next(
        ast.literal_eval(node.value)
        for node in module.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics"
    )

    def part(held: bool) -> str:
        chosen = sorted((t for t in topics if (_rank(t) < _DOCS_HELDOUT_SHARE) == held), key=_rank)
        return "\n\n".join(topics[t] for t in chosen)

    if heldout:
        return part(True)
    # help topics repeat each other's sections: a paragraph the held-out part has is not calibrated on
    seen = set(part(True).split("\n\n"))
    return "\n\n".join(p for p in part(False).split("\n\n") if p not in seen)


_KINDS: dict[str, Callable[[bool], str]] = {"python-code": _code, "python-docs": _docs}
NAMES = tuple(name + suffix for name in _KINDS for suffix in ("", HELDOUT))


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


@cache
def builtin_text(source: str) -> str:
    """The text a ``builtin:NAME`` source names; an unknown name is the user's error, named."""
    name = source.removeprefix(PREFIX)
    kind = name.removesuffix(HELDOUT)
    if kind not in _KINDS:
        raise UserError(f"unknown built-in text {source!r}: known are {', '.join(PREFIX + n for n in NAMES)}")
    return _KINDS[kind](name.endswith(HELDOUT))
