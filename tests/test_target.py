"""The checks on output.dir: overwrite by manifest only, no links, names and places a run cannot use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pruning.errors import UserError
from pruning.rundir.target import (
    build_manifest,
    check_output_dir,
    check_writable,
    read_manifest,
    resolve_target,
)
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


def test_a_symlinked_run_json_is_no_manifest(tmp_path: Path):
    """A run.json that is a link vouches for nothing: it may be anyone's record, listing anything."""
    real = finish_run(tmp_path / "real")
    target = tmp_path / "out"
    (target / "models").mkdir(parents=True)
    (target / "models" / "model.safetensors").write_bytes(b"the user's weights")
    (target / "run.json").symlink_to(real / "run.json")
    assert read_manifest(real) is not None  # the record it points to is valid
    assert read_manifest(target) is None
    with pytest.raises(UserError, match="holds files that are not from a pruning run"):
        check_output_dir(target, True, "/nonexistent")


def test_an_output_dir_that_is_the_model_dir_is_refused(tmp_path: Path):
    """Equal paths overlap as surely as nested ones: checked before anything else, however the source
    is spelt, even when the directory holds a finished run's files and nothing else."""
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(UserError, match=r"output.dir .*/model and the source model .*/model overlap"):
        check_output_dir(empty, False, str(empty))
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(UserError, match="overlap"):
        check_output_dir(empty, False, str(tmp_path / "link"))
    finished = finish_run(tmp_path / "run")
    with pytest.raises(UserError, match="overlap"):
        check_output_dir(finished, True, str(finished) + "/")


def test_files_listed_two_levels_deep_are_the_runs_own(tmp_path: Path):
    """A hook's plots in analysis/plots/: every directory above a listed file is the run's, not only the
    one holding it."""
    files = {
        "models/model.safetensors": b"weights",
        "analysis/plots/a.png": b"png",
        "analysis/plots/layers/7.png": b"png7",
        "plan.json": b"{}",
    }
    target = finish_run(tmp_path / "out", files)
    assert set(check_output_dir(target, True, "/nonexistent")) == set(files)


# -- each refusal on its own, each boundary from both sides ---------------------------------------------


def test_the_longest_name_the_staging_directory_can_follow(tmp_path: Path):
    """255 bytes per name, less the 32 the staging name adds: 223 is accepted, 224 refused."""
    assert resolve_target(str(tmp_path / ("a" * 223))).name == "a" * 223
    with pytest.raises(UserError, match="is 224 bytes long; at most 223"):
        resolve_target(str(tmp_path / ("a" * 224)))


def test_a_run_json_of_another_report_type_is_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A valid report of another kind (a plan saved as run.json) lists no files: it cannot vouch."""
    from pruning import reports

    target = finish_run(tmp_path / "out")
    monkeypatch.setattr(reports, "load", lambda path: {"report_type": "pruning_plan", "files": {}})
    with pytest.raises(UserError, match=r"run.json is a pruning_plan, not a run record"):
        read_manifest(target)


def test_a_symlinked_directory_in_a_run_is_one_stranger_and_never_walked(tmp_path: Path):
    """Walking through the link would list (and cost a walk of) whatever it points at: the home
    directory, or /."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    for name in "abcde":
        (elsewhere / "deep" / name).write_text(name)
    target = finish_run(tmp_path / "out")
    (target / "models" / "link").symlink_to(elsewhere)
    with pytest.raises(UserError) as info:
        check_output_dir(target, True, "/nonexistent")
    assert str(info.value) == (
        f"output.dir {target} holds models/link (a symlink); overwrite replaces only what a previous run "
        "wrote, so it refuses: move that away or choose another output.dir"
    )


def test_a_file_the_run_did_not_write_is_refused_by_name(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    (target / "models" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match=r"holds models/notes.txt \(not written by a pruning run\);"):
        check_output_dir(target, True, "/nonexistent")


@pytest.mark.parametrize(("count", "more"), [(3, ""), (4, " and 1 more"), (6, " and 3 more")])
def test_the_refusal_names_three_strangers_and_counts_the_rest(tmp_path: Path, count: int, more: str):
    target = finish_run(tmp_path / "out")
    for i in range(count):
        (target / f"user{i}.txt").write_text("x")
    with pytest.raises(UserError) as info:
        check_output_dir(target, True, "/nonexistent")
    named = ", ".join(f"user{i}.txt (not written by a pruning run)" for i in range(3))
    assert f"holds {named}{more}; overwrite replaces only" in str(info.value)


@pytest.mark.parametrize("where", ["output inside the model", "model inside the output"])
def test_an_output_dir_overlapping_the_model_either_way_is_refused(tmp_path: Path, where: str):
    model = tmp_path / "model"
    target = model / "pruned" if where == "output inside the model" else tmp_path / "out"
    model = model if where == "output inside the model" else target / "model"
    model.mkdir(parents=True)
    with pytest.raises(UserError, match="and the source model .* overlap"):
        check_output_dir(target, False, str(model))


def test_an_output_dir_beside_the_model_is_no_overlap(tmp_path: Path):
    (tmp_path / "model").mkdir()
    assert check_output_dir(tmp_path / "model-pruned", False, str(tmp_path / "model")) is None


def test_an_existing_file_at_the_output_dir_is_refused(tmp_path: Path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(UserError, match="output.dir .*out exists and is not a directory"):
        check_output_dir(tmp_path / "out", True, "/nonexistent")


def test_an_empty_directory_is_used_without_overwrite(tmp_path: Path):
    (tmp_path / "out").mkdir()
    assert check_output_dir(tmp_path / "out", False, "/nonexistent") is None


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path: Path):
    target = finish_run(tmp_path / "out")
    with pytest.raises(UserError, match="exists and is not empty; set output.overwrite: true"):
        check_output_dir(target, False, "/nonexistent")
    assert set(check_output_dir(target, True, "/nonexistent")) == {
        "models/model.safetensors",
        "models/config.json",
        "plan.json",
    }


def test_missing_parents_are_fine_when_the_first_existing_one_is_writable(tmp_path: Path):
    check_writable(tmp_path / "a" / "b" / "out")


def test_a_file_where_a_parent_should_be_is_refused(tmp_path: Path):
    (tmp_path / "a").write_text("a file")
    with pytest.raises(UserError, match=r"output.dir .*: .*/a is not a directory"):
        check_writable(tmp_path / "a" / "b" / "out")


def test_a_parent_that_is_not_writable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Root writes everywhere, so the answer of ``os.access`` is what is simulated."""
    from pruning.rundir import target as target_module

    monkeypatch.setattr(target_module.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=rf"output.dir .*: {tmp_path} is not writable"):
        check_writable(tmp_path / "out")


def test_exactly_enough_free_space_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    from pruning.rundir import target as target_module

    usage = shutil.disk_usage(tmp_path)._replace(free=10 * 2**30)
    monkeypatch.setattr(target_module.shutil, "disk_usage", lambda path: usage)
    check_writable(tmp_path / "out", needed_bytes=10 * 2**30)
    with pytest.raises(UserError, match="has 10.00 GiB free, the run needs about 10.00 GiB"):
        check_writable(tmp_path / "out", needed_bytes=10 * 2**30 + 1)


def test_the_manifest_lists_the_runs_regular_files_and_nothing_else(tmp_path: Path):
    """Not run.json (it holds the manifest), not a symlink or a FIFO, nothing reached through a linked
    directory: a manifest is the list of what a later overwrite may delete."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "model.safetensors").write_bytes(b"w")
    (run / "run.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("p")
    (run / "linked").symlink_to(elsewhere)
    (run / "models" / "link.txt").symlink_to(elsewhere / "precious.txt")
    os.mkfifo(run / "pipe")
    assert list(build_manifest(run)) == ["models/model.safetensors"]
