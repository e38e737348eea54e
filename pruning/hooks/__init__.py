"""Lifecycle hooks: the pipeline's extension point.

See ``pruning.hooks.base`` for the interface and docs/hooks.md for an example.
"""

from pruning.hooks.base import Event, Hook
from pruning.hooks.registry import ENTRY_POINT_GROUP, HookRegistry, default_registry
from pruning.hooks.runner import HookError, HookRunner

__all__ = [
    "ENTRY_POINT_GROUP",
    "Event",
    "Hook",
    "HookError",
    "HookRegistry",
    "HookRunner",
    "default_registry",
]
