"""A time limit on a call that may hang (Torch-Pruning's tracer did), and errors in one line."""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
import warnings
from collections.abc import Iterator
from typing import Any


def _where(exc: BaseException) -> str:
    """Where an exception was raised, as ``file:line in function`` (site-packages stripped)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, _Hung):  # the last frame is the alarm's handler; report where it interrupted
        frames = frames[:-1]
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.split('site-packages/')[-1]}:{last.lineno} in {last.name}"


def error_text(exc: BaseException) -> str:
    if isinstance(exc, _Hung):
        return f"no result after {exc.args[0]:.0f} s, stopped in {_where(exc)} (hangs)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]} ({_where(exc)})"


class _Hung(TimeoutError):
    """Raised into a Torch-Pruning call that ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` with ``_Hung``: Torch-Pruning's dependency tracing loops
    forever on some GQA shapes (4 query heads over 2 KV heads, for one). Needs the main thread (SIGALRM);
    elsewhere the block runs without a deadline. Torch-Pruning's warnings are silenced inside."""
    with warnings.catch_warnings():
        # It warns, once per trace, that it will prune the norms' weights along their only dimension:
        # right for RMSNorm, and noise in every row's log.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            yield
            return
        with _alarm(seconds):
            yield


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds`` raises ``_Hung`` in the main thread; the old handler comes back after."""

    def interrupt(signum: int, frame: Any) -> None:
        raise _Hung(seconds)

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
