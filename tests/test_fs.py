"""Reading whole files and replacing files: only regular files, bounded, one line for anything else."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pruning.errors import UserError
from pruning.storage.fs import read_regular_file, read_text_file_bounded, replace_problem, write_bytes_atomic
from pruning.storage.json_files import read_json_object, write_json_atomic


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    return fifo


def test_a_regular_file_is_read_whole(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 100_000)
    assert read_regular_file(path, what="text", limit=100_000) == b"x" * 100_000


def test_a_fifo_is_refused_without_blocking(tmp_path: Path):
    """Opening a FIFO for reading blocks until a writer comes; the reader must not wait for one."""
    fifo = _fifo(tmp_path)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _catch(outcome, fifo), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the thread (a writer opens the FIFO) before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], UserError)
    assert str(outcome[0]) == f"{fifo}: not a regular file (a FIFO, device or socket); give a config file"


def _catch(outcome: list[BaseException], path: Path) -> None:
    try:
        read_regular_file(path, what="config", limit=1000)
    except BaseException as e:  # noqa: BLE001 - the test inspects whatever was raised
        outcome.append(e)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_refused_before_a_byte_is_read(device: str):
    with pytest.raises(UserError, match=rf"^{device}: not a regular file"):
        read_regular_file(device, what="config", limit=1 << 20)


def test_a_directory_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match=r": is a directory, not a JSON report$"):
        read_regular_file(tmp_path, what="JSON report", limit=10)


def test_a_file_larger_than_the_cap_is_refused_unread(tmp_path: Path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(10**12)  # a sparse terabyte: reading it would exhaust memory
    with pytest.raises(
        UserError, match=r"1000000000000 bytes, more than a config file may hold \(16 bytes\)"
    ):
        read_regular_file(path, what="config file", limit=16)


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(UserError, match=r"missing\.json: JSON file not found$"):
        read_json_object(tmp_path / "missing.json")


def test_text_that_is_not_utf8_is_named_with_its_offset(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc\xff")
    with pytest.raises(UserError, match=r"the calibration file is not UTF-8 text \(byte 3\)"):
        read_text_file_bounded(path, what="calibration file", limit=100)


def test_a_5000_digit_integer_in_json_is_one_line(tmp_path: Path):
    """Python refuses to convert an integer of more than 4300 digits (ValueError, not JSONDecodeError)."""
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": ' + "9" * 5000 + "}")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON \(Exceeds the limit") as info:
        read_json_object(path)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "dangling symlink"])
def test_replacing_anything_but_a_regular_file_is_refused(tmp_path: Path, kind: str):
    """An atomic write renames over its path: a symlink, a FIFO or /dev/stdout would become a plain file."""
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    path = tmp_path / "out.json"
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(UserError, match=rf"^{path}: is "):
        write_json_atomic(path, {"a": 1})
    assert victim.read_text() == "{}"
    assert path.is_symlink() if "symlink" in kind else not path.is_file()  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim.json", "out.json"])


def test_a_regular_file_or_a_new_name_is_written(tmp_path: Path):
    existing = tmp_path / "a.json"
    existing.write_text("old")
    assert replace_problem(existing) is None and replace_problem(tmp_path / "new.json") is None
    write_bytes_atomic(existing, b"new")
    assert existing.read_bytes() == b"new"


def test_a_device_node_is_never_replaced():
    assert replace_problem(Path("/dev/null")) == (
        "is not a regular file (a FIFO, device or socket); the tool writes only a regular file or a new "
        "name, and would replace it"
    )
