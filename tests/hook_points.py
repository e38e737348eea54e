"""Hooks that misbehave on purpose at a chosen event, for the reliability tests (run in real processes).

``Fault(event=..., action=...)``: at ``event`` it writes ``marker`` (so the test knows where the run is)
and then does ``action``:

- ``wait``: sleep until the file ``release`` exists (the test kills or releases the run meanwhile);
- ``wait_in_save``: let the save start, and wait inside it once the weights are written;
- ``exit``: ``sys.exit(0)``; ``interrupt``: raise KeyboardInterrupt (as Ctrl-C does);
- ``enospc``: raise ``OSError(ENOSPC)``, as a full disk does;
- ``file_limit``: lower ``ulimit -f`` to ``limit`` bytes, so the checkpoint's write fails with EFBIG;
- ``fill``: write zeros to the file ``fill`` until its filesystem is full (really ENOSPC).
"""

from __future__ import annotations

import errno
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from pruning.hooks import Hook

_WAIT_LIMIT_S = 120  # a forgotten release must not hang CI


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + _WAIT_LIMIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


class Fault(Hook):
    def __init__(
        self, event: str, action: str, marker: str = "", release: str = "", limit: int = 0, fill: str = ""
    ) -> None:
        self.event, self.action, self.limit, self.fill = event, action, limit, fill
        self.marker = Path(marker) if marker else None
        self.release = Path(release) if release else None

    def _fire(self, event: str, context: Any) -> None:
        if event != self.event:
            return
        if self.action == "wait_in_save":
            self._wait_inside_save(context)
            return
        if self.marker:
            self.marker.write_text(str(context.output_dir))
        if self.action == "wait":
            _wait_for(self.release)
        elif self.action == "exit":
            sys.exit(0)
        elif self.action == "interrupt":
            raise KeyboardInterrupt
        elif self.action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        elif self.action == "file_limit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))
        elif self.action == "fill":
            _fill(Path(self.fill))

    def _wait_inside_save(self, context: Any) -> None:
        original = context.model.save_pretrained

        def save_then_wait(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)  # weights on disk; layout and checks not yet written
            self.marker.write_text(str(args[0]))
            _wait_for(self.release)
            return result

        context.model.save_pretrained = save_then_wait

    def before_prune(self, context: Any, **kwargs: Any) -> None:
        self._fire("before_prune", context)

    def after_prune(self, context: Any, **kwargs: Any) -> None:
        self._fire("after_prune", context)

    def after_save(self, context: Any, **kwargs: Any) -> None:
        self._fire("after_save", context)


class Misspelt(Hook):
    """``after_prun`` would never fire; building this hook must fail."""

    def after_prun(self, context: Any, **kwargs: Any) -> None:
        pass


class BrokenConstructor:
    def __init__(self) -> None:
        raise RuntimeError("cannot reach the metrics server")

    def after_save(self, context: Any, **kwargs: Any) -> None:
        pass
