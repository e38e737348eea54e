"""The checks on output.dir: overwrite by manifest only, no links, names and places a run cannot use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pruning.errors import UserError
from pruning.rundir.target import build_manifest, check_output_dir, check_writable, resolve_target
from pruning.storage.fs import relative_path_problem, remove_listed
from tests.finished_runs import finish_run


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
    record["files"]["../victim.txt"] = {"size": 4, "mtime_ns": 0}
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


def _with_manifest_entry(target: Path, name: str) -> dict[str, str]:
    """Add ``name`` to the finished run's manifest (a hand-edited run.json); return the tree's bytes."""
    record = json.loads((target / "run.json").read_text())
    record["files"][name] = {"size": 1, "mtime_ns": 0}
    (target / "run.json").write_text(json.dumps(record))
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("models/evil\0name", "must not contain a control character"),
        ("line\nbreak", "must not contain a control character"),
        ("x" * 256, "has a component longer than 255 bytes"),
        ("a/" * 2100 + "b", "is longer than 4096 bytes"),
        ("a//b", "must be a path inside the run's directory"),
        ("./plan.json", "must be a path inside the run's directory"),
    ],
)
def test_a_manifest_name_no_file_could_have_is_refused_before_anything_is_touched(
    tmp_path: Path, name: str, why: str
):
    """Finding 1 of the second hostile round: such a name passed validation, the overwrite published,
    then removing the old run failed on the name and left .out.previous-* for good."""
    target = finish_run(tmp_path / "out")
    before = _with_manifest_entry(target, name)
    with pytest.raises(UserError) as info:
        check_output_dir(target, True, "/nonexistent")
    message = str(info.value)
    assert "run.json is not a valid run record" in message and why in message and "\n" not in message
    assert len(message) < 600  # the name is quoted shortened, whatever its length
    after = {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "out"]


@pytest.mark.parametrize(
    "name", ["analysis/plots/a.png", "models/model-00001-of-00002.safetensors", "é.json"]
)
def test_names_a_run_writes_are_accepted(name: str):
    assert relative_path_problem(name) is None


def test_a_file_a_hook_named_unlistably_fails_the_manifest(tmp_path: Path):
    (tmp_path / "ok.json").write_text("{}")
    (tmp_path / "bad\tname").write_text("{}")
    with pytest.raises(UserError, match="must not contain a control character"):
        build_manifest(tmp_path)


def test_a_same_size_edit_in_place_is_refused(tmp_path: Path):
    """Finding 2: a byte changed, the size kept; the manifest's mtime_ns shows it (a size alone did not)."""
    target = finish_run(tmp_path / "out")
    config = target / "models" / "config.json"
    before = config.stat()
    with open(config, "r+b") as f:  # in place: same inode, same size
        f.write(b"[]")
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000))  # as a fast second write would
    assert config.stat().st_size == before.st_size and config.stat().st_ino == before.st_ino
    with pytest.raises(UserError, match=r"models/config\.json \(changed since the run wrote it\)"):
        check_output_dir(target, True, "/nonexistent")


def test_a_same_size_edit_by_write_and_rename_is_refused(tmp_path: Path):
    """An editor writes a new file and renames it over the old one: same size, a new time."""
    target = finish_run(tmp_path / "out")
    config = target / "models" / "config.json"
    before = config.stat()
    replacement = target / "models" / ".config.json.swp"
    replacement.write_bytes(b"[]")
    replacement.rename(config)
    assert config.stat().st_size == before.st_size and config.stat().st_mtime_ns != before.st_mtime_ns
    with pytest.raises(UserError, match=r"models/config\.json \(changed since the run wrote it\)"):
        check_output_dir(target, True, "/nonexistent")


def test_a_run_copied_with_its_times_may_still_be_overwritten(tmp_path: Path):
    """``cp -a`` or ``rsync -a`` keeps sizes and times but not inodes: the copy is still the run's."""
    import shutil

    copy = Path(shutil.copytree(finish_run(tmp_path / "out"), tmp_path / "copy"))
    assert set(check_output_dir(copy, True, "/nonexistent")) == {
        "models/model.safetensors",
        "models/config.json",
        "plan.json",
    }


def test_an_untouched_run_may_be_overwritten(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    (target / "models" / "config.json").read_bytes()  # reading changes no stamp
    assert set(check_output_dir(target, True, "/nonexistent")) == {
        "models/model.safetensors",
        "models/config.json",
        "plan.json",
    }


def test_a_copy_that_kept_whole_seconds_only_may_still_be_overwritten(tmp_path: Path):
    """``scp -p``, tar, exFAT or SMB keep the second, not the nanoseconds: still the run's files."""
    target = finish_run(tmp_path / "out")
    for path in target.rglob("*"):
        if path.is_file():
            mtime = path.stat().st_mtime_ns
            os.utime(path, ns=(mtime, mtime // 10**9 * 10**9))
    assert "plan.json" in check_output_dir(target, True, "/nonexistent")
    plan = target / "plan.json"
    os.utime(plan, ns=(0, plan.stat().st_mtime_ns + 10**9))  # a whole second later: a write
    with pytest.raises(UserError, match=r"plan\.json \(changed since the run wrote it\)"):
        check_output_dir(target, True, "/nonexistent")


def test_a_file_name_that_is_not_utf8_cannot_enter_a_manifest(tmp_path: Path):
    """A hook wrote ``\\xff.txt``: its name could not be written into run.json (UnicodeEncodeError)."""
    (tmp_path / "models").mkdir()
    with open(os.path.join(os.fsencode(tmp_path / "models"), b"\xff.txt"), "wb") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=r"the run wrote a file whose name must be a UTF-8 file name"):
        build_manifest(tmp_path)
