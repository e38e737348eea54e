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


_WHAT_IS_THERE = {"directory": "is a directory", "fifo": "is not a regular file", "symlink": "is a symlink"}


@pytest.mark.parametrize("kind", sorted(_WHAT_IS_THERE))
def test_the_lock_path_check_names_what_is_there(tmp_path: Path, kind: str):
    """Each kind has its own words: a check that called a symlink "not a regular file" would send the
    user looking for the wrong thing (every message ends "remove it", so the test above cannot tell)."""
    from pruning.rundir.lock import check_lock_path

    target = tmp_path / "out"
    path = lock_path(target)
    {"directory": path.mkdir, "fifo": lambda: os.mkfifo(path), "symlink": lambda: path.symlink_to(tmp_path)}[
        kind
    ]()
    with pytest.raises(UserError) as info:
        check_lock_path(target)
    assert str(info.value) == f"output.dir {target}: the lock file {path} {_WHAT_IS_THERE[kind]}; remove it"


def test_the_lock_path_check_passes_nothing_and_a_dead_runs_file(tmp_path: Path):
    from pruning.rundir.lock import check_lock_path

    target = tmp_path / "out"
    assert check_lock_path(target) is None  # nothing there yet
    lock_path(target).write_text("{}")
    assert check_lock_path(target) is None  # a lock file a killed run left: acquire takes it over


def test_the_lock_path_check_reports_a_path_it_cannot_look_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Root reads every directory, so the refusal is simulated: an lstat that fails for another reason
    than a missing file is one line naming the lock file, not a traceback."""
    from pruning.rundir import lock

    target = tmp_path / "out"

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lock.os, "lstat", refuse)
    with pytest.raises(UserError, match=r"the lock file .*\.out\.lock cannot be opened \(permission denied"):
        lock.check_lock_path(target)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_refusals_and_release_leave_no_descriptor_open(tmp_path: Path):
    """A lock that leaks its descriptor on a refusal keeps the lock file open for the life of the process
    (a notebook retrying a run), and a leaked descriptor of a held lock would hold the flock forever."""
    target = tmp_path / "out"
    before = _open_fds()
    with OutputLock(target):
        for _ in range(3):
            with pytest.raises(UserError, match="in use by another run"):
                OutputLock(target).acquire()
    assert _open_fds() == before
    os.mkfifo(lock_path(target))
    with pytest.raises(UserError, match="is not a regular file"):
        OutputLock(target).acquire()
    assert _open_fds() == before


def test_a_failing_flock_is_raised_and_closes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only "held by another" becomes the friendly refusal; any other failure (a filesystem without
    locks answers ENOLCK) propagates, never taken as a lock that is held."""
    from pruning.rundir import lock

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    target = tmp_path / "out"
    before = _open_fds()
    with pytest.raises(OSError, match="No locks available"):
        OutputLock(target).acquire()
    assert _open_fds() == before


def test_a_lock_file_removed_before_it_is_locked_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The holder removes the file as it releases; a run that locked the removed file would hold a lock
    nobody else can see. So the run opens the path again, and the lock it holds is on the file there."""
    import fcntl

    from pruning.rundir import lock

    target = tmp_path / "out"
    real_flock, calls = fcntl.flock, []

    def released_meanwhile(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            lock_path(target).unlink()  # the previous holder's release, between our open and our flock
        real_flock(fd, operation)

    monkeypatch.setattr(lock.fcntl, "flock", released_meanwhile)
    before = _open_fds()
    with OutputLock(target) as held:
        assert len(calls) == 2
        assert os.fstat(held._fd).st_ino == os.stat(lock_path(target)).st_ino
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert _open_fds() == before


def test_release_after_the_lock_file_was_removed(tmp_path: Path):
    """Someone removed the lock file while the run held it: release has nothing to remove, and says
    nothing; it must not remove a file another run has since created at the path."""
    target = tmp_path / "out"
    held = OutputLock(target)
    held.acquire()
    lock_path(target).unlink()
    lock_path(target).write_text("another run's lock")
    held.release()
    assert lock_path(target).read_text() == "another run's lock"
    lock_path(target).unlink()
    with OutputLock(target) as again:
        lock_path(target).unlink()
        again.release()  # the file is gone: nothing to remove, no error
        assert again._fd is None


def test_the_lock_file_is_created_readable_by_all_writable_by_its_owner(tmp_path: Path):
    """0o666 less the umask, as any file the user creates: never executable, never writable by others."""
    target = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with OutputLock(target):
            assert lock_path(target).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_the_holder_record_replaces_a_longer_stale_one_and_reads_back(tmp_path: Path, monkeypatch):
    """The record is rewritten from the start of a truncated file: a stale record longer than ours must
    not leave its tail behind (the file would no longer be JSON, and the next run could not name us)."""
    from pruning.rundir import lock

    target = tmp_path / "out"
    lock_path(target).write_text(json.dumps({"pid": 1, "command": "x" * 2000}))
    monkeypatch.setattr(lock.sys, "argv", ["run_global_pruning.py", "--set", "y" * 1000])
    with OutputLock(target) as held:
        on_disk = json.loads(lock_path(target).read_text())
        assert on_disk["pid"] == os.getpid()
        assert on_disk["command"] == ("run_global_pruning.py --set " + "y" * 1000)[:500]
        assert lock._read_holder(held._fd) == on_disk  # read from the start, wherever the offset is


def test_an_oversized_holder_record_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A holder record is read up to 64 KiB and no further (a lock file is ours and small; a bigger one
    is not a record): it counts as a run that is starting, without reading the rest."""
    target = tmp_path / "out"
    record = json.dumps({"pid": 1, "host": "here", "pad": ""})
    pad = 64 * 1024 + 1 - len(record)
    lock_path(target).write_text(json.dumps({"pid": 1, "host": "here", "pad": "p" * pad}))
    assert lock_path(target).stat().st_size == 64 * 1024 + 1
    with caplog.at_level(logging.WARNING, logger="pruning.rundir.lock"), OutputLock(target):
        pass
    assert "taking over a stale lock" not in caplog.text
