"""Staged runs: published whole by renames or not at all, recovered after a kill, no link followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pruning import reports
from pruning.errors import UserError
from pruning.rundir import staging
from pruning.rundir.target import resolve_target
from tests.finished_runs import finish_run, publish_new_run, siblings, staged
from tests.tiny_pipeline import tree_digest


def test_new_directory_is_published_whole(tmp_path: Path):
    target = tmp_path / "nested" / "out"
    publish_new_run(target, overwrite=False)
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    info = (target / "models" / "model.safetensors").stat()
    assert reports.load(target / "run.json")["files"] == {
        "models/model.safetensors": {"size": 11, "mtime_ns": info.st_mtime_ns}
    }
    assert siblings(target) == []  # no staging directory and no lock file left behind


def test_nothing_appears_before_publish_and_a_failure_leaves_no_trace(tmp_path: Path):
    target = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="hook failed"), staged(target, overwrite=False) as run:
        (run.staging / "models").mkdir()
        (run.staging / "models" / "model.safetensors").write_bytes(b"half")
        assert not target.exists() and run.staging.parent == target.parent
        raise RuntimeError("hook failed")
    assert not (tmp_path / "nested").exists()  # the parents this run created are gone too


def test_overwrite_replaces_exactly_the_previous_run(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    publish_new_run(target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "models",
        "models/model.safetensors",
        "run.json",
    ]
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert siblings(target) == []


def test_previous_run_is_byte_for_byte_intact_until_publish(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    before = tree_digest(target)
    with pytest.raises(KeyboardInterrupt), staged(target) as run:
        finish_run(run.staging, {"models/model.safetensors": b"new"}, tmp=tmp_path)
        assert tree_digest(target) == before
        raise KeyboardInterrupt
    assert tree_digest(target) == before and siblings(target) == []


def test_publish_without_an_atomic_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    target = finish_run(tmp_path / "out")
    publish_new_run(target)
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert siblings(target) == []


def test_a_publish_interrupted_between_two_renames_is_restored(tmp_path: Path):
    """The fallback renames target -> .previous, then staging -> target; a crash between leaves no target."""
    target = finish_run(tmp_path / "out")
    before = tree_digest(target)
    target.rename(tmp_path / ".out.previous-123-abcdef01")
    (tmp_path / ".out.staging-123-abcdef01").mkdir()
    (tmp_path / ".out.staging-123-abcdef01" / "half.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty"), staged(target, overwrite=False):
        pass
    assert tree_digest(target) == before and siblings(target) == []


def test_an_interrupted_cleanup_of_the_previous_run_is_finished(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    old = finish_run(tmp_path / ".out.previous-9-ffffffff", {"plan.json": b"old"})
    (old / "mine.txt").write_text("not the tool's")
    publish_new_run(target)
    assert [p.name for p in old.iterdir()] == ["mine.txt"]  # the listed files went; the stranger stayed


def test_user_files_inside_run_directories_are_refused(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    (target / "models" / "my-llama").mkdir()
    (target / "models" / "my-llama" / "config.json").write_text("{}")
    (target / "models" / "my_notes.txt").write_text("notes")
    before = tree_digest(target)
    with pytest.raises(UserError) as info:
        publish_new_run(target)
    assert "models/my-llama/" in str(info.value) and "models/my_notes.txt" in str(info.value)
    assert tree_digest(target) == before and (target / "models" / "my-llama").is_dir()


def test_a_symlinked_target_is_followed_once_and_kept(tmp_path: Path):
    real = finish_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    target = resolve_target(str(link))
    assert target == real.resolve()
    publish_new_run(target)
    assert link.is_symlink() and (link / "models" / "model.safetensors").read_bytes() == b"new weights"


def test_a_file_added_during_the_swap_is_kept_by_this_run_and_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    target = finish_run(tmp_path / "out")
    real_exchange = staging.exchange

    def user_writes_then_swap(a: Path, b: Path) -> bool:
        (target / "my_eval_notes.txt").write_text("mine")  # written while the run was finishing
        return real_exchange(a, b)

    monkeypatch.setattr(staging, "exchange", user_writes_then_swap)
    publish_new_run(target)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.previous-")]
    assert len(kept) == 1 and [p.name for p in kept[0].iterdir()] == ["my_eval_notes.txt"]
    assert "kept" in caplog.text and "my_eval_notes.txt" in caplog.text
    monkeypatch.setattr(staging, "exchange", real_exchange)
    publish_new_run(target, b"third")  # the next run finishes the cleanup by manifest: the note stays
    assert (kept[0] / "my_eval_notes.txt").read_text() == "mine"


def test_other_targets_siblings_are_not_ours(tmp_path: Path):
    """A run into ``out`` must not touch what a run into ``out.staging-2`` keeps beside it."""
    other = tmp_path / ".out.staging-2.staging-77-abcdef01"
    other.mkdir()
    (other / "weights").write_text("another run's")
    (tmp_path / ".out.staging-2.lock").write_text("{}")
    (tmp_path / ".out.previous-1").mkdir()  # not a name this tool makes
    publish_new_run(tmp_path / "out")
    assert (other / "weights").is_file() and (tmp_path / ".out.staging-2.lock").is_file()
    assert (tmp_path / ".out.previous-1").is_dir()


def test_ctrl_c_during_publish_waits_until_the_renames_are_done():
    import signal

    reached = []
    with pytest.raises(KeyboardInterrupt), staging._signals_deferred():  # delivered when the block ends
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")
    assert reached == ["after the signal"]


def test_a_symlink_named_like_our_staging_is_not_followed(tmp_path: Path):
    """Anyone who can write beside output.dir could plant this; the run it points to must survive."""
    important = finish_run(tmp_path / "home" / "important_run")
    before = tree_digest(important)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / ".out.staging-1-abcdef12").symlink_to(important)
    (shared / ".out.previous-1-abcdef12").symlink_to(important)
    publish_new_run(shared / "out")
    assert tree_digest(important) == before


def test_a_failed_cleanup_after_publishing_is_a_warning(tmp_path: Path, monkeypatch, caplog):
    target = finish_run(tmp_path / "out")

    def denied(old: Path, manifest: dict) -> None:
        raise PermissionError(13, "Permission denied", str(old))

    monkeypatch.setattr(staging, "_remove_previous", denied)
    publish_new_run(target)  # published: the new run is in place whatever the old one's removal does
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert "could not finish removing" in caplog.text and "rm -r -- " in caplog.text
    monkeypatch.undo()
    publish_new_run(target, b"third")  # and the next run is not blocked by the leftover
    assert siblings(target) == []


def test_a_refused_rename_keeps_the_complete_run_visible(tmp_path: Path, monkeypatch):
    import errno

    target = finish_run(tmp_path / "out")
    before = tree_digest(target)
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    real_rename = os.rename

    def cross_device(src, dst):
        if Path(src) == target:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", cross_device)
    with pytest.raises(
        UserError, match=r"could not publish \(Invalid cross-device link\); the complete run is kept"
    ):
        publish_new_run(target)
    monkeypatch.undo()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unpublished-")]
    assert len(kept) == 1 and (kept[0] / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert tree_digest(target) == before
    publish_new_run(target)  # a later run never deletes the kept copy
    assert kept[0].is_dir()


def test_only_a_whole_previous_run_is_restored(tmp_path: Path):
    leftover = tmp_path / ".out.previous-5-abcdef12"
    leftover.mkdir()
    (leftover / "notes.txt").write_text("kept from an earlier publish")
    publish_new_run(tmp_path / "out", overwrite=False)  # the user removed out/: start afresh
    assert (tmp_path / "out" / "run.json").is_file() and (leftover / "notes.txt").is_file()


def test_signals_are_held_while_other_threads_run():
    """torch runs worker threads; the kernel may hand them the signal: it must still wait."""
    import signal
    import threading

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt), staging._signals_deferred():
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signals")
    finally:
        stop.set()
        worker.join()
    assert reached == ["after the signals"]


def test_a_leftover_that_cannot_be_removed_never_stops_a_run(tmp_path: Path, monkeypatch, caplog):
    """Whatever a killed run's staging directory holds, the next runs go on and say how to remove it."""
    target = finish_run(tmp_path / "out")
    leftover = tmp_path / ".out.staging-77-0123abcd"
    (leftover / "models").mkdir(parents=True)

    def refused(path: Path) -> None:
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(staging, "remove_tree", refused)
    for _ in range(2):  # this run and the next: neither is stopped
        publish_new_run(target)
        assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert leftover.is_dir()
    assert f"could not finish removing {leftover} (Device or resource busy)" in caplog.text
    assert f"rm -r -- {leftover}" in caplog.text


def test_a_removal_failing_on_a_name_is_a_warning_not_a_wedge(tmp_path: Path, monkeypatch, caplog):
    """Finding 1: remove_listed raised ValueError (a NUL in a name) and every later run failed."""
    target = finish_run(tmp_path / "out")

    def bad_name(root: Path, names) -> list[Path]:
        raise ValueError("embedded null byte")

    monkeypatch.setattr(staging, "remove_listed", bad_name)
    publish_new_run(target)
    monkeypatch.undo()
    assert "embedded null byte" in caplog.text and [s for s in siblings(target) if ".previous-" in s]
    publish_new_run(target, b"third")  # the next run finishes the removal and publishes
    assert (target / "models" / "model.safetensors").read_bytes() == b"third" and siblings(target) == []


def test_a_restore_that_fails_is_one_line_saying_what_to_rename(tmp_path: Path, monkeypatch):
    target = finish_run(tmp_path / "out")
    previous = tmp_path / ".out.previous-123-abcdef01"
    target.rename(previous)
    real_rename = os.rename

    def refuse_restore(src, dst) -> None:
        if Path(src) == previous:
            raise OSError(13, "Permission denied", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", refuse_restore)
    with pytest.raises(UserError) as info, staged(target, overwrite=False):
        pass
    assert str(info.value) == (
        f"output.dir {target} is missing and {previous} holds the run an interrupted publish replaced, but "
        f"renaming it back failed (Permission denied); rename it to {target} yourself"
    )
    assert previous.is_dir() and not target.exists()


def _near_misses(parent: Path) -> dict[str, dict[str, str]]:
    """Directories named almost as this tool names its own beside ``out``: a user's backups and copies.
    One holds a whole run (run.json and all), so it looks restorable to a run that matched by prefix."""
    staging_copy = parent / ".out.staging-1-abcdef12.bak"
    (staging_copy / "models").mkdir(parents=True)
    (staging_copy / "models" / "model.safetensors").write_bytes(b"a user's staged weights")
    (parent / ".out.staging-1-abcdef123").mkdir()  # nine hex digits, not eight
    (parent / ".out.staging-1-abcdef123" / "notes.txt").write_text("mine")
    finish_run(parent / ".out.previous-1-abcdef12.bak", {"plan.json": b"the backed-up run"}, tmp=parent)
    (parent / ".out.previous-22-abcdef12~").mkdir()
    (parent / ".out.previous-22-abcdef12~" / "plan.json").write_text("an editor's copy")
    return {p.name: tree_digest(p) for p in parent.iterdir() if p.name.startswith(".out.")}


@pytest.mark.parametrize("previous_run", [False, True])
def test_names_that_only_begin_like_ours_are_never_recovered(tmp_path: Path, previous_run: bool):
    """Only the exact names a run makes are its leftovers: a prefix match would restore the backed-up run
    as output.dir (no target) or delete its files by manifest (a target holding a run), and remove the
    staging copy whole."""
    target = finish_run(tmp_path / "out") if previous_run else tmp_path / "out"
    before = _near_misses(tmp_path)
    publish_new_run(target)  # overwrite: true, so a wrongly restored run would be replaced, not refused
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert not (target / "plan.json").exists()  # the new run, not the backed-up one restored
    assert {p.name: tree_digest(p) for p in tmp_path.iterdir() if p.name.startswith(".out.")} == before


def test_a_failed_second_rename_of_the_fallback_puts_the_previous_run_back(tmp_path: Path, monkeypatch):
    """Without an atomic swap the previous run is renamed away first; if the staged run cannot then take
    its place, the previous run must go back at once: output.dir is never left missing by a live run."""
    import errno

    target = finish_run(tmp_path / "out", {"plan.json": b"the previous run", "models/a.bin": b"old"})
    before = tree_digest(target)
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    real_rename = os.rename
    refused = []

    def second_rename_fails(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".out.staging-"):
            refused.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", second_rename_fails)
    with pytest.raises(
        UserError, match=r"could not publish \(No space left on device\); the complete run is"
    ):
        publish_new_run(target)
    monkeypatch.undo()
    assert len(refused) == 1  # the first rename (target -> .previous) went through; this one did not
    assert tree_digest(target) == before and target.is_dir()
    assert siblings(target) == []  # no .out.previous-* holds the run instead of output.dir
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unpublished-")]
    assert len(kept) == 1 and (kept[0] / "models" / "model.safetensors").read_bytes() == b"new weights"


def test_several_previous_runs_and_no_target_are_all_left_alone(tmp_path: Path, caplog):
    """Only one interrupted publish can be restored unambiguously. With two whole previous runs beside a
    missing output.dir, nothing says which was published last: neither is restored, both stay whole
    (each named in a warning), the staging leftover goes, and the new run publishes into a new directory."""
    first = finish_run(tmp_path / ".out.previous-123-abcdef01", {"plan.json": b"first"}, tmp=tmp_path)
    second = finish_run(tmp_path / ".out.previous-124-abcdef02", {"plan.json": b"second"}, tmp=tmp_path)
    emptied = tmp_path / ".out.previous-125-abcdef03"  # a previous run whose listed files already went
    (emptied / "models").mkdir(parents=True)
    (emptied / "mine.txt").write_text("not the tool's")
    half = tmp_path / ".out.staging-126-abcdef04"
    (half / "models").mkdir(parents=True)
    (half / "models" / "model.safetensors").write_bytes(b"half")
    leftovers = {p: tree_digest(p) for p in (first, second, emptied)}
    target = tmp_path / "out"
    with staged(target, overwrite=True) as run:  # a restored run would then pass every later check
        assert not target.exists()  # recovered: nothing was renamed to output.dir
        finish_run(run.staging, {"models/model.safetensors": b"new weights"}, tmp=tmp_path)
        run.publish()
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert not (target / "plan.json").exists()
    assert {p: tree_digest(p) for p in leftovers} == leftovers
    assert not half.exists()
    for previous in leftovers:
        assert f"left {previous} alone: {target} does not hold a published run" in caplog.text


def test_entering_checks_the_target_again_under_the_lock(tmp_path: Path):
    """The preflight check ran before the lock: whatever appeared since must be refused on entering,
    before a staging directory (and hours of pruning) exist, not only at publish time."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    entered = []
    with pytest.raises(UserError, match="exists and is not empty"), staged(target, overwrite=False):
        entered.append(True)
    assert entered == [] and siblings(target) == []


def test_a_published_run_says_so(tmp_path: Path):
    target = tmp_path / "new" / "out"
    with staged(target, overwrite=False) as run:
        finish_run(run.staging, {"models/model.safetensors": b"w"}, tmp=tmp_path)
        assert run.published is False
        run.publish()
        assert run.published is True
    assert (target / "run.json").is_file() and siblings(target) == []


def test_restoring_an_interrupted_publish_touches_nothing_else(tmp_path: Path, caplog):
    """The restored directory is no leftover any more: the recovery must not go on to "clean" it."""
    target = finish_run(tmp_path / "out")
    before = tree_digest(target)
    target.rename(tmp_path / ".out.previous-123-abcdef01")
    with pytest.raises(UserError, match="not empty"), staged(target, overwrite=False):
        pass
    assert tree_digest(target) == before and siblings(target) == []
    assert "restored" in caplog.text and "could not finish removing" not in caplog.text


def test_an_invalid_run_record_is_never_restored(tmp_path: Path, caplog):
    """A previous-run directory whose run.json does not validate cannot vouch for being a whole run."""
    leftover = finish_run(tmp_path / ".out.previous-5-abcdef12")
    (leftover / "run.json").write_text('{"report_type": "run_record"}')
    before = tree_digest(leftover)
    publish_new_run(tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert tree_digest(leftover) == before  # neither restored nor cleaned: it is not provably ours


def test_a_leftover_staging_directory_is_removed_and_named(tmp_path: Path, caplog):
    target = finish_run(tmp_path / "out")
    leftover = tmp_path / ".out.staging-77-0123abcd"
    (leftover / "models").mkdir(parents=True)
    (leftover / "models" / "half.safetensors").write_bytes(b"half")
    publish_new_run(target)
    assert not leftover.exists()
    assert (
        "removed .out.staging-77-0123abcd, the staging directory of a run that did not finish" in caplog.text
    )


def test_a_staging_leftover_with_an_invalid_record_is_left_and_not_called_removed(tmp_path: Path, caplog):
    target = finish_run(tmp_path / "out")
    leftover = tmp_path / ".out.staging-77-0123abcd"
    leftover.mkdir()
    (leftover / "run.json").write_text("not json")
    publish_new_run(target)
    assert (leftover / "run.json").read_text() == "not json"
    assert f"left {leftover} alone: its run.json is not a valid run record" in caplog.text
    assert "removed .out.staging" not in caplog.text


def test_a_staging_leftover_that_cannot_be_removed_is_not_called_removed(tmp_path: Path, monkeypatch, caplog):
    target = finish_run(tmp_path / "out")
    leftover = tmp_path / ".out.staging-77-0123abcd"
    leftover.mkdir()

    def refused(path: Path) -> None:
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(staging, "remove_tree", refused)
    publish_new_run(target)
    assert leftover.is_dir() and "could not finish removing" in caplog.text
    assert "removed .out.staging" not in caplog.text


def test_a_previous_runs_emptied_directory_is_removed(tmp_path: Path):
    """A previous run whose listed files and run.json are gone (its removal was interrupted) leaves
    empty directories: they go, so no leftover piles up beside the output."""
    target = finish_run(tmp_path / "out")
    leftover = tmp_path / ".out.previous-9-ffffffff"
    (leftover / "models" / "sub").mkdir(parents=True)
    publish_new_run(target)
    assert not leftover.exists() and siblings(target) == []


def test_a_staged_run_holds_the_lock_until_it_ends(tmp_path: Path):
    """Two runs into one output.dir would each recover (delete) the other's staging directory."""
    target = tmp_path / "out"
    with staged(target, overwrite=False) as run:
        with pytest.raises(UserError, match="is in use by another run"), staged(target, overwrite=False):
            pass
        assert run.staging.is_dir()  # the refused run touched nothing of ours
    with staged(target, overwrite=False):  # released: free again
        pass
