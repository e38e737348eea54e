"""The output-directory lock: exclusive, names its holder, stale locks detected and taken over."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pruning.errors import UserError
from pruning.rundir.lock import OutputLock, lock_path


def test_second_holder_is_refused_with_the_first_named(tmp_path: Path):
    target = tmp_path / "out"
    with OutputLock(target):
        holder = json.loads(lock_path(target).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(UserError) as info, OutputLock(target):
            pass
        message = str(info.value)
        assert f"output.dir {target} is in use by another run (pid {os.getpid()}, started " in message
        assert holder["started_at"] in message and str(lock_path(target)) in message
    assert not lock_path(target).exists()  # released and removed
    with OutputLock(target):  # free again
        pass


def test_lock_held_by_another_process(tmp_path: Path):
    target = tmp_path / "out"
    code = (
        "import sys, time; from pathlib import Path; from pruning.rundir.lock import OutputLock\n"
        f"lock = OutputLock(Path({str(target)!r})); lock.acquire(); print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another run .pid {child.pid},"), OutputLock(target):
            pass
    finally:
        child.kill()  # SIGKILL: the kernel drops the flock, the file stays behind
        child.wait(timeout=30)
    assert lock_path(target).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": "here", "started_at": "2026-01-01T00:00:00+00:00"}
    lock_path(target).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="pruning.rundir.lock"), OutputLock(target):
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock on {target}: pid {dead.pid}" in caplog.text
    assert not lock_path(target).exists()


def test_a_symlinked_lock_file_is_never_written_through(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out"
    lock_path(target).symlink_to(victim)
    with (
        pytest.raises(UserError, match=r"the lock file .*\.out\.lock is a symlink; remove it"),
        OutputLock(target),
    ):
        pass
    assert victim.read_text() == "precious" and lock_path(target).is_symlink()


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_anything_but_a_file_at_the_lock_path_is_one_line_naming_the_fix(tmp_path: Path, kind: str):
    """Finding 7: a directory at ``.<name>.lock`` was a traceback (IsADirectoryError) on every run."""
    from pruning.rundir.lock import check_lock_path

    target = tmp_path / "out"
    path = lock_path(target)
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(tmp_path / "elsewhere")
    for attempt in (lambda: check_lock_path(target), OutputLock(target).acquire):
        with pytest.raises(UserError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"output.dir {target}: the lock file {path} ") and message.endswith(
            "remove it"
        )
    assert os.path.lexists(path) and not (tmp_path / "elsewhere").exists()  # nothing made or removed
