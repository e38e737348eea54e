"""An exclusive lock on an output directory, held for a whole run.

The lock is ``flock`` on a small file beside the directory (``.<name>.lock``), so the kernel releases it
when its holder dies, however it dies: a lock file whose lock nobody holds is stale by definition, and
the next run takes it over and says so. The file records the holder (pid, host, start time, command) so
a refused run can name it. Beside, not inside: the run swaps the directory itself when it publishes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from pruning.errors import UserError
from pruning.storage.fs import os_error_reason

logger = logging.getLogger(__name__)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def check_lock_path(target: Path) -> None:
    """What is at the lock path can be a lock file: nothing yet, or a regular file (a dead run's). The
    run's ``acquire`` refuses the rest; this says so before loading, and in ``--dry-run``."""
    path = lock_path(target)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"output.dir {target}: the lock file {path} {_open_problem(e)}") from e
    if stat.S_ISLNK(mode):
        raise UserError(f"output.dir {target}: the lock file {path} is a symlink; remove it")
    if stat.S_ISDIR(mode):
        raise UserError(f"output.dir {target}: the lock file {path} is a directory; remove it")
    if not stat.S_ISREG(mode):
        raise UserError(f"output.dir {target}: the lock file {path} is not a regular file; remove it")


class OutputLock:
    """``with OutputLock(target):`` holds the lock, or raises a UserError naming the run that holds it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = lock_path(target)
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:  # never through a symlink: the file is truncated and rewritten below
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                raise UserError(
                    f"output.dir {self.target}: the lock file {self.path} {_open_problem(e)}"
                ) from e
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UserError(
                    f"output.dir {self.target}: the lock file {self.path} is not a regular file; remove it"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(
                    f"output.dir {self.target} is in use by another run ({_describe(holder)}); "
                    f"wait for it or choose another output.dir (lock: {self.path})"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: try again
        previous = _read_holder(fd)
        if previous:
            logger.warning(
                "taking over a stale lock on %s: %s no longer holds it (it ended without cleaning up)",
                self.target,
                _describe(previous),
            )
        _write_holder(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file while still holding the lock, then let go."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None


def _open_problem(error: OSError) -> str:
    """What stops the lock file from being opened, and how to fix it, in the user's words."""
    if error.errno == errno.ELOOP:
        return "is a symlink; remove it"
    if error.errno == errno.EISDIR:
        return "is a directory; remove it"
    return f"cannot be opened ({os_error_reason(error)})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 64 * 1024) or b"{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_holder(fd: int) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "a run that is starting"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    return f"pid {holder['pid']}{where}, started {holder.get('started_at', 'at an unknown time')}"
