"""A run's private staging directory beside ``output.dir``, published by renames only when complete.

A run never writes into ``output.dir`` itself. It holds an exclusive lock on it (``pruning.rundir.lock``),
writes everything (checkpoint, reports, plan, run record) into ``.<name>.staging-<pid>-<id>`` beside it
and, only when all of it is complete, publishes: into a new or empty directory with one rename, over a
previous run with one atomic swap (Linux ``renameat2``; two renames elsewhere, recovered by the next run
if interrupted between them). Until that moment the previous run is untouched, byte for byte, whatever
fails: a hook, a full disk, SIGKILL, Ctrl-C. The replaced run's files are then removed by its manifest
(``pruning.rundir.target``). Leftovers of killed runs are named as such and finished by the next run.
See docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pruning.errors import UserError
from pruning.rundir.lock import OutputLock
from pruning.rundir.target import RUN_RECORD, check_output_dir, read_manifest
from pruning.storage.fs import exchange, remove_listed, remove_tree

logger = logging.getLogger(__name__)

_STAGING, _PREVIOUS = "staging", "previous"
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _siblings(target: Path, kind: str) -> list[Path]:
    """This target's own staging or previous-run directories: exactly the names ``_sibling`` makes."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-\d+-[0-9a-f]{{8}}")
    if not target.parent.is_dir():
        return []
    return sorted(
        p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )


@dataclass
class StagedRun:
    """``with StagedRun(target, overwrite, model_path) as run:`` write into ``run.staging``, then
    ``run.publish()``. Leaving the block without publishing removes the staging directory; the target is
    never touched before ``publish``."""

    target: Path
    overwrite: bool
    model_path: str
    staging: Path = field(init=False)
    published: bool = field(default=False, init=False)
    _lock: OutputLock | None = field(default=None, init=False)
    _created: list[Path] = field(default_factory=list, init=False)

    def __enter__(self) -> StagedRun:
        self._make_parents()
        self._lock = OutputLock(self.target)
        try:
            self._lock.acquire()
            self._recover()
            check_output_dir(self.target, self.overwrite, self.model_path)  # again, now under the lock
            self.staging = _sibling(self.target, _STAGING)
            self.staging.mkdir()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def publish(self) -> None:
        """Make the staged run the target's content: renames only, after one last check of the target.

        Ctrl-C and SIGTERM wait until the renames are done, so a run is published whole or not at all.
        If the filesystem refuses the renames, the complete run is kept under a visible name instead.
        """
        with _signals_deferred():
            manifest = check_output_dir(self.target, self.overwrite, self.model_path)
            try:
                replaced = self._swap_in(over_previous=manifest is not None)
            except OSError as e:
                reason = e.strerror or str(e)
                raise UserError(
                    f"output.dir {self.target}: could not publish ({reason}); {self._keep()}"
                ) from e
            self.published = True
            if replaced is not None:
                _clean_up(replaced, manifest)

    def _swap_in(self, over_previous: bool) -> Path | None:
        """The renames; returns where the replaced run now is (None if there was none).

        Raises OSError only when nothing was published (the target is as it was).
        """
        if not over_previous:
            os.rename(self.staging, self.target)  # replaces an empty directory atomically
            return None
        old = _sibling(self.target, _PREVIOUS)
        if exchange(self.staging, self.target):
            try:
                os.rename(self.staging, old)  # the swap left the previous run under the staging name
            except OSError:
                return self.staging  # cleaned by its manifest now, or by the next run
            return old
        os.rename(self.target, old)  # a crash before the next rename: see _recover
        try:
            os.rename(self.staging, self.target)
        except BaseException:
            os.rename(old, self.target)
            raise
        return old

    def _keep(self) -> str:
        """Move the complete, unpublished run to a name no run of this tool ever deletes."""
        kept = self.target.parent / f"{self.target.name}.unpublished-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.staging, kept)
        except OSError:
            return f"the complete run stays in {self.staging} until the next run into {self.target}"
        return f"the complete run is kept in {kept}"

    def _make_parents(self) -> None:
        missing = []
        parent = self.target.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def _recover(self) -> None:
        """Finish what a killed run left beside the target (we hold the lock, so nobody else is running)."""
        previous_runs = _siblings(self.target, _PREVIOUS)
        restorable = [p for p in previous_runs if _holds_run(p)]
        if not self.target.exists() and len(restorable) == 1:  # killed between the fallback's renames
            try:
                os.rename(restorable[0], self.target)
            except OSError as e:
                raise UserError(
                    f"output.dir {self.target} is missing and {restorable[0]} holds the run an interrupted "
                    f"publish replaced, but renaming it back failed ({e.strerror}); rename it to "
                    f"{self.target} yourself"
                ) from e
            logger.warning("restored %s from an interrupted publish (%s)", self.target, restorable[0].name)
            previous_runs.remove(restorable[0])
        for previous in previous_runs:
            if _holds_run(self.target):  # replaced by a published run: finish removing it
                _clean_up(previous, None)
            else:
                logger.warning("left %s alone: %s does not hold a published run", previous, self.target)
        for staging in _siblings(self.target, _STAGING):
            if _clean_up(staging, None, staged=True):
                logger.warning("removed %s, the staging directory of a run that did not finish", staging.name)

    def _close(self) -> None:
        try:
            staging = getattr(self, "staging", None)
            if not self.published and staging is not None and staging.exists():
                _clean_up(staging, None, staged=True)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if not self.published:
                for path in reversed(self._created):
                    try:
                        path.rmdir()
                    except OSError:
                        break  # something else was put there meanwhile; it stays


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers they had.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the kernel
    chose (torch starts many), so handlers that only take note defer the signal reliably; a thread
    mask would not. Outside the main thread handlers cannot be set, and signals are not held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum)) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def _discard(directory: Path, staged: bool) -> bool:
    """Remove a directory this tool made beside the target, and nothing in it that is not its own.

    With a valid run.json it holds a whole run (staged, or a previous one swapped out): only the files
    its manifest lists go. Without one, a staging directory (``staged``) is a run that never finished,
    all of it written by that run, and all of it goes; a previous run's directory has already lost its
    listed files, and what is left is not ours: only empty directories go.
    """
    try:
        manifest = read_manifest(directory)
    except UserError:
        logger.warning("left %s alone: its %s is not a valid run record", directory, RUN_RECORD)
        return False
    if manifest is not None:
        _remove_previous(directory, manifest)
    elif staged:
        remove_tree(directory)
    else:
        _remove_previous(directory, {})
    return True


def _holds_run(directory: Path) -> bool:
    try:
        return read_manifest(directory) is not None
    except UserError:
        return False


def _clean_up(old: Path, manifest: dict[str, dict[str, int]] | None, staged: bool = False) -> bool:
    """Remove a replaced run after publishing, or a leftover before a run; True if it went.

    A failure is a warning naming the directory and the command that removes it, never an error: the
    new run is already in place, or does not need the leftover (its own names are new), so whatever a
    leftover holds, no later run is stopped by it.
    """
    try:
        if manifest is None:
            return _discard(old, staged=staged)
        _remove_previous(old, manifest)
    except (OSError, ValueError, RecursionError) as e:  # a name the OS cannot take; a tree 1,000 deep
        logger.warning(
            "could not finish removing %s (%s); no run needs it: remove it yourself (rm -r -- %s)",
            old,
            e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__),
            shlex.quote(str(old)),
        )
        return False
    return True


def _remove_previous(old: Path, manifest: dict[str, dict[str, int]]) -> None:
    """Delete the files a previous run listed (and its run.json); anything else stays, and is named."""
    left = remove_listed(old, [*manifest, RUN_RECORD])
    if left:
        logger.warning(
            "kept %s: it holds %s, which the previous run did not write", old, ", ".join(map(str, left[:3]))
        )
