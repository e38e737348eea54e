"""Lifecycle events and the hook interface.

A hook is any class with one or more of the methods below; subclassing ``Hook`` is optional and only
documents them. Each method takes the run's ``PipelineContext`` plus ``**kwargs``, so fields added to
events later never break an existing hook.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pruning.hooks.context import PipelineContext


class Event(str, Enum):
    """Pipeline events, in the order they fire; the values are the names users write."""

    BEFORE_PRUNE = "before_prune"
    AFTER_PRUNE = "after_prune"
    AFTER_SAVE = "after_save"


class Hook:
    """Base class with empty event methods. Constructor keyword arguments are the YAML ``params``."""

    def before_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Fires when the model is loaded and nothing has been changed yet."""

    def after_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Fires when the model has been pruned in memory (``context.plan`` is set)."""

    def after_save(self, context: PipelineContext, **kwargs: Any) -> None:
        """Fires when the pruned checkpoint is on disk (``context.checkpoint_dir`` is set)."""
