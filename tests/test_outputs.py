"""The output directory: staged runs published by renames, overwrite by manifest, recovery, no links."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from pruning import outputs, reports
from pruning.config import load_config
from pruning.context import PipelineContext
from pruning.errors import UserError
from pruning.outputs import StagedRun, build_manifest, check_output_dir, check_writable, resolve_target
from pruning.run_record import build_run_record
from tests.tiny_pipeline import tree_digest

RUN_FILES = {"models/model.safetensors": b"weights", "models/config.json": b"{}", "plan.json": b"{}"}


def finish_run(directory: Path, files: dict[str, bytes] = RUN_FILES, tmp: Path | None = None) -> Path:
    """A directory as a finished run leaves it: its files plus a valid run.json listing them."""
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    config_file = (tmp or directory.parent) / "cfg.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"path": "m"}, "pruning": {"ratio": 0.2}}))
    context = PipelineContext(config=load_config(config_file), output_dir=directory, model_path="m")
    context.params_before, context.params_after = 100, 80
    context.layer_params_before, context.layer_params_after = 90, 70
    record = build_run_record(context, datetime.now(timezone.utc), directory, build_manifest(directory))
    reports.save(record, directory / "run.json")
    return directory


def staged(target: Path, overwrite: bool = True) -> StagedRun:
    return StagedRun(target, overwrite, "/nonexistent/source")


def publish_new_run(target: Path, content: bytes = b"new weights", overwrite: bool = True) -> None:
    with staged(target, overwrite) as run:
        finish_run(run.staging, {"models/model.safetensors": content}, tmp=target.parent)
        run.publish()


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_new_directory_is_published_whole(tmp_path: Path):
    target = tmp_path / "nested" / "out"
    publish_new_run(target, overwrite=False)
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert reports.load(target / "run.json")["files"] == {"models/model.safetensors": 11}
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
    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
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


def test_an_empty_user_directory_is_refused_too(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    (target / "keep").mkdir()
    with pytest.raises(UserError, match="keep/ .not written by a pruning run"):
        check_output_dir(target, True, "/nonexistent")


def test_a_changed_file_is_refused(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    (target / "plan.json").write_text('{"edited": true}')
    with pytest.raises(UserError, match="plan.json .changed since the run wrote it"):
        check_output_dir(target, True, "/nonexistent")


def test_a_symlink_in_the_run_is_refused_and_never_followed(tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    target = finish_run(tmp_path / "out")
    (target / "models" / "model.safetensors").unlink()
    (target / "models" / "model.safetensors").symlink_to(precious / "data.txt")
    with pytest.raises(UserError, match="model.safetensors .a symlink"):
        check_output_dir(target, True, "/nonexistent")
    assert (precious / "data.txt").read_text() == "keep"


def test_listed_removal_never_follows_links(tmp_path: Path):
    from pruning.fsutil import remove_listed

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("keep")
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "a.bin").write_text("a")
    (root / "linked").symlink_to(outside)
    left = remove_listed(root, ["models/a.bin", "linked/x.txt", "../outside/x.txt"])
    assert (outside / "x.txt").read_text() == "keep"
    assert [p.name for p in left] == ["linked"] and not (root / "models").exists()


def test_a_manifest_cannot_name_files_outside_the_run(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    record = json.loads((target / "run.json").read_text())
    record["files"]["../victim.txt"] = 4
    (target / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"not a valid run record.*\$\.files\['\.\./victim\.txt'\]"):
        check_output_dir(target, True, "/nonexistent")


def test_a_run_json_without_a_manifest_is_refused(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "run.json").write_text('{"name": "from an older version"}')
    (target / "models").mkdir()
    with pytest.raises(UserError, match="run.json is not a valid run record"):
        check_output_dir(target, True, "/nonexistent")


def test_a_symlinked_target_is_followed_once_and_kept(tmp_path: Path):
    real = finish_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    target = resolve_target(str(link))
    assert target == real.resolve()
    publish_new_run(target)
    assert link.is_symlink() and (link / "models" / "model.safetensors").read_bytes() == b"new weights"


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_output_dir_is_refused(value: str):
    with pytest.raises(UserError, match="output.dir: must not be empty"):
        resolve_target(value)


def test_dangling_symlink_target_is_refused(tmp_path: Path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="is a symlink to nothing"):
        resolve_target(str(tmp_path / "link"))


def test_not_enough_free_space_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(UserError, match=r"GiB free, the run needs about"):
        check_writable(tmp_path / "out", needed_bytes=2**62)
    assert list(tmp_path.iterdir()) == []


def test_a_file_added_during_the_swap_is_kept_by_this_run_and_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    target = finish_run(tmp_path / "out")
    real_exchange = outputs.exchange

    def user_writes_then_swap(a: Path, b: Path) -> bool:
        (target / "my_eval_notes.txt").write_text("mine")  # written while the run was finishing
        return real_exchange(a, b)

    monkeypatch.setattr(outputs, "exchange", user_writes_then_swap)
    publish_new_run(target)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.previous-")]
    assert len(kept) == 1 and [p.name for p in kept[0].iterdir()] == ["my_eval_notes.txt"]
    assert "kept" in caplog.text and "my_eval_notes.txt" in caplog.text
    monkeypatch.setattr(outputs, "exchange", real_exchange)
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
    with pytest.raises(KeyboardInterrupt), outputs._signals_deferred():  # delivered when the block ends
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")
    assert reached == ["after the signal"]


def test_a_mount_point_cannot_be_published_over():
    with pytest.raises(UserError, match="output.dir /proc is a mount point; .*such as /proc/run"):
        check_output_dir(Path("/proc"), True, "/nonexistent")


def test_names_the_staging_directory_cannot_follow(tmp_path: Path):
    with pytest.raises(UserError, match="output.dir: must not contain a NUL"):
        resolve_target("out\0x")
    with pytest.raises(UserError, match=r"is 240 bytes long; at most 223"):
        resolve_target(str(tmp_path / ("a" * 240)))
    assert resolve_target(".") == Path(os.getcwd())
    assert resolve_target(str(tmp_path / "x" / "..")) == tmp_path


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

    monkeypatch.setattr(outputs, "_remove_previous", denied)
    publish_new_run(target)  # published: the new run is in place whatever the old one's removal does
    assert (target / "models" / "model.safetensors").read_bytes() == b"new weights"
    assert "could not finish removing the replaced run" in caplog.text
    monkeypatch.undo()
    publish_new_run(target, b"third")  # and the next run is not blocked by the leftover
    assert siblings(target) == []


def test_a_refused_rename_keeps_the_complete_run_visible(tmp_path: Path, monkeypatch):
    import errno

    target = finish_run(tmp_path / "out")
    before = tree_digest(target)
    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    real_rename = os.rename

    def cross_device(src, dst):
        if Path(src) == target:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", cross_device)
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
        with pytest.raises(KeyboardInterrupt), outputs._signals_deferred():
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signals")
    finally:
        stop.set()
        worker.join()
    assert reached == ["after the signals"]
