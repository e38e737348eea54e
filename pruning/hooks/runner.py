"""Fire events on the configured hooks, in config order, with each hook's on_error policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pruning.config import HookConfig
from pruning.errors import UserError
from pruning.hooks.base import Event
from pruning.hooks.context import PipelineContext
from pruning.hooks.registry import HookRegistry, default_registry, instantiate
from pruning.storage.fs import SPACE_ERRNOS, disk_errno

logger = logging.getLogger(__name__)


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):  # sys.exit() in a hook must not end the run as a success
        return f"it called sys.exit({error.code!r}), which does not end a run early"
    return f"{type(error).__name__}: {error}"


class HookError(UserError):
    """A hook failed; the message names the hook and the event. The run exits with code 1, or 2 when
    the hook refused the user's input (it raised a UserError)."""

    exit_code = 1


@dataclass
class ActiveHook:
    name: str
    on_error: str
    instance: Any


class HookRunner:
    """Holds the run's hook instances and emits events to them."""

    def __init__(self, hooks: list[ActiveHook]) -> None:
        self.hooks = hooks

    @classmethod
    def from_config(cls, configs: tuple[HookConfig, ...], registry: HookRegistry | None = None) -> HookRunner:
        """Resolve and construct every configured hook before the run starts (fail fast on typos)."""
        registry = registry or default_registry()
        hooks = []
        for i, hc in enumerate(configs):
            hook_cls = registry.resolve(hc.name)
            hooks.append(
                ActiveHook(hc.name, hc.on_error, instantiate(hook_cls, hc.params, f"hooks[{i}] {hc.name}"))
            )
        return cls(hooks)

    def emit(self, event: Event, context: PipelineContext, **kwargs: Any) -> None:
        """Call ``event`` on every hook that has it; failures raise HookError or, with on_error: warn, log.

        ``SystemExit`` from a hook is a failure like any other; ``KeyboardInterrupt`` (Ctrl-C, SIGTERM)
        stops the run, whatever ``on_error`` says.
        """
        for hook in self.hooks:
            method = getattr(hook.instance, event.value, None)
            if method is None:
                continue
            try:
                method(context, **kwargs)
            except (Exception, SystemExit) as e:  # reported with the hook's name, never swallowed silently
                if disk_errno(e) in SPACE_ERRNOS:
                    raise  # a full disk is the run's problem, reported as such
                message = f"hook {hook.name!r} failed at {event.value}: {_describe(e)}"
                if hook.on_error == "warn":
                    logger.warning("%s (on_error: warn, the run goes on)", message)
                    continue
                failure = HookError(message)
                if isinstance(e, UserError) and not isinstance(e, HookError):
                    failure.exit_code = UserError.exit_code  # bad input (a text too short), not a bug
                raise failure from e
