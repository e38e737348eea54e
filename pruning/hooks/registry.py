"""Names in YAML -> hook classes: built-ins, import paths, and third-party entry points.

Nothing is imported or run unless a config names it: entry points in the group ``pruning.hooks`` are
looked up only for a name that is neither built in nor an import path.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pruning.errors import UserError
from pruning.hooks.base import Event

ENTRY_POINT_GROUP = "pruning.hooks"
_EVENT_PREFIXES = ("before_", "after_", "on_")


class HookRegistry:
    """Explicit registration by name; one registry per run, no global state."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], type]] = {}

    def register(self, name: str, factory: Callable[[], type]) -> None:
        """``factory`` returns the class, so registering a built-in imports nothing heavy."""
        if name in self._factories:
            raise ValueError(f"hook name {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        plugin_names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
        return sorted(set(self._factories) | plugin_names)

    def resolve(self, name: str) -> type:
        """The class for a registered name, an import path ``pkg.module:Class``, or an entry point."""
        if name in self._factories:
            return self._factories[name]()
        if ":" in name:
            return _import_path(name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                try:
                    return ep.load()
                except Exception as e:  # a broken plugin is reported by name, not as a traceback
                    raise UserError(f"hooks: plugin {name!r} ({ep.value}) failed to load: {e}") from e
        raise UserError(f"hooks: unknown hook {name!r}; known hooks: {', '.join(self.names())}")


def _import_path(spec: str) -> type:
    """Import ``module:Class``; the working directory is searched too, so a local ``my_hooks.py`` works."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or a SyntaxError/any error raised while importing the user's module
        raise UserError(
            f"hooks: cannot import {module_name!r} for hook {spec!r}: {type(e).__name__}: {e}"
        ) from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserError(f"hooks: module {module_name!r} has no attribute {attr!r}")
    if not any(callable(getattr(cls, event.value, None)) for event in Event):
        raise UserError(f"hooks: {spec!r} has none of the event methods {[e.value for e in Event]}")
    return cls


def _perplexity_hook() -> type:
    from pruning.hooks.perplexity import PerplexityHook

    return PerplexityHook


def _analysis_hook() -> type:
    from pruning.hooks.analysis import AnalysisHook

    return AnalysisHook


def _plot_hook() -> type:
    from pruning.hooks.plot import PlotHook

    return PlotHook


def _gguf_hook() -> type:
    from pruning.hooks.gguf import GgufHook

    return GgufHook


def default_registry() -> HookRegistry:
    """A registry with the built-in hooks."""
    registry = HookRegistry()
    registry.register("analysis", _analysis_hook)
    registry.register("perplexity", _perplexity_hook)
    registry.register("gguf", _gguf_hook)
    registry.register("plot", _plot_hook)
    return registry


def check_event_methods(cls: type, label: str) -> None:
    """Refuse a method that looks like an event but is none (``after_prun``): it would never fire.

    Looks like an event: named ``before_*``, ``after_*`` or ``on_*``, or close to an event's name.
    """
    events = [e.value for e in Event]
    for name in dir(cls):
        if name in events or name.startswith("_") or not callable(getattr(cls, name, None)):
            continue
        close = difflib.get_close_matches(name, events, n=1, cutoff=0.8)
        if close or name.startswith(_EVENT_PREFIXES):
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"hooks: {label}: method {name!r} looks like an event but is not one{hint}; "
                f"events are {', '.join(events)}"
            )


def instantiate(cls: type, params: dict[str, Any], label: str) -> Any:
    """Build a hook from its YAML params; whatever its constructor raises is reported in one line."""
    check_event_methods(cls, label)
    try:
        return cls(**params)
    except UserError:  # already one complete line for the user (the plot hook's missing matplotlib)
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"hooks: {label}: bad params {params}: {e}") from e
    except (Exception, SystemExit) as e:  # a hook's constructor is the user's code: name it, no traceback
        raise UserError(f"hooks: {label}: its constructor raised {type(e).__name__}: {e}") from e
