"""Third-party extensions through entry points: named without importing, loaded only when asked for.

A package declares an entry point in a group (``pruning.families``, ``pruning.criteria``) whose name is
what a config or a checkpoint names and whose value is ``module:Object``. Nothing is imported until a
run needs that name, so an installed plugin does nothing until it is used; a broken one is one line.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from pruning.errors import UserError


def plugin_names(group: str) -> set[str]:
    """The names the installed packages declare in ``group`` (nothing is imported)."""
    return {ep.name for ep in entry_points(group=group)}


def load_plugin(group: str, name: str, label: str) -> tuple[object, str] | None:
    """The object the entry point ``name`` of ``group`` points at, imported now, and where it is
    (``module:Object``); None when no package declares it. ``label`` says what kind of plugin it is in
    the one-line error of a broken one."""
    for ep in entry_points(group=group):
        if ep.name != name:
            continue
        try:
            return ep.load(), ep.value
        except Exception as e:  # a broken plugin is named, not a traceback
            raise UserError(f"{label} plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e
    return None
