"""Nothing lost: real pruning processes killed, interrupted, run twice at once, out of disk, read-only.

Each case starts ``run_global_pruning.py`` on the tiny model, makes it fail at a chosen point (a hook in
``tests/hook_points.py`` marks where the run is and waits), and checks the promise: the previous run in
the output directory is intact byte for byte, nothing half-written is visible, and the next run cleans
up what a killed one left. Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pruning import reports
from pruning.cli import main
from tests.tiny_pipeline import REPO, build_tiny_model_dir, tree_digest, write_config

SCRIPT = REPO / "run_global_pruning.py"
TIMEOUT_S = 180
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """One finished run, copied by each test that needs a previous run to protect."""
    base = tmp_path_factory.mktemp("finished")
    out = base / "out"
    assert main(["--config", str(write_config(base / "first.yaml", tiny_dir, out))]) == 0
    return out


@pytest.fixture
def previous(tmp_path: Path, finished_run: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def fault(event: str, action: str, tmp_path: Path, **params: object) -> dict:
    return {
        "name": "tests.hook_points:Fault",
        "params": {
            "event": event,
            "action": action,
            "marker": str(tmp_path / "marker"),
            "release": str(tmp_path / "release"),
            **params,
        },
    }


def start(config: Path, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching the marker: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach the marker in time")
        time.sleep(0.05)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == lines[0]
    return lines[0]


# -- SIGKILL, Ctrl-C, SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "action"),
    [
        ("before_prune", "wait"),
        ("after_prune", "wait"),
        ("after_prune", "wait_in_save"),
        ("after_save", "wait"),
    ],
    ids=["loaded", "pruned", "mid-save", "saved"],
)
def test_sigkill_at_any_stage_leaves_the_previous_run_intact(
    tmp_path: Path, tiny_dir: Path, previous: Path, event: str, action: str, caplog: pytest.LogCaptureFixture
):
    before = tree_digest(previous)
    hooks = ["analysis", fault(event, action, tmp_path)]
    config = write_config(tmp_path / "kill.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=hooks)
    proc = start(config)
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert tree_digest(previous) == before
    staging = [name for name in leftovers(previous) if name.startswith(".out.staging-")]
    assert len(staging) == 1 and ".out.lock" in leftovers(previous)  # what the killed run left

    again = write_config(tmp_path / "again.yaml", tiny_dir, previous, output={"overwrite": True})
    assert main(["--config", str(again)]) == 0
    assert leftovers(previous) == []
    assert "taking over a stale lock" in caplog.text and f"removed {staging[0]}" in caplog.text
    record = reports.load(previous / "run.json")
    assert record["config"]["hooks"][0]["name"] == "analysis" and tree_digest(previous) != before


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_interrupt_cleans_up_and_keeps_the_previous_run(
    tmp_path: Path, tiny_dir: Path, previous: Path, sig: int, code: int, word: str
):
    before = tree_digest(previous)
    hooks = [fault("after_save", "wait", tmp_path)]
    config = write_config(tmp_path / "int.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=hooks)
    proc = start(config)
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(sig)
    returncode, err = finish(proc)
    assert returncode == code and err.strip().splitlines()[-1] == word and "Traceback" not in err
    assert tree_digest(previous) == before and leftovers(previous) == []


# -- two runs at once --------------------------------------------------------------------------------


def test_second_run_into_the_same_directory_fails_at_once(tmp_path: Path, tiny_dir: Path):
    out = tmp_path / "out"
    first_config = write_config(
        tmp_path / "a.yaml", tiny_dir, out, hooks=[fault("before_prune", "wait", tmp_path)]
    )
    first = start(first_config)
    try:
        wait_for(tmp_path / "marker", first)
        second = start(write_config(tmp_path / "b.yaml", tiny_dir, out, output={"overwrite": True}))
        began = time.monotonic()
        code, err = finish(second)
        assert code == 2 and time.monotonic() - began < 60
        line = one_error_line(err)
        assert f"output.dir {out} is in use by another run (pid {first.pid}, started " in line
    finally:
        (tmp_path / "release").write_text("go")
    code, err = finish(first)
    assert code == 0, err[-3000:]
    assert reports.load(out / "run.json")["config_file"] == str(first_config) and leftovers(out) == []


# -- full disk, size limits, read-only, umask --------------------------------------------------------


def test_file_size_limit_hit_while_saving(tmp_path: Path, tiny_dir: Path, previous: Path):
    """``ulimit -f`` lowered after the checks (so the checkpoint's write itself fails with EFBIG)."""
    before = tree_digest(previous)
    hooks = ["analysis", fault("after_prune", "file_limit", tmp_path, limit=20_000)]
    config = write_config(tmp_path / "big.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=hooks)
    code, err = finish(start(config))
    line = one_error_line(err)
    assert code == 2 and f"output.dir {previous}: file too large" in line and "(EFBIG)" in line
    assert "nothing was published" in line
    assert tree_digest(previous) == before and leftovers(previous) == []


def test_file_size_limit_below_the_checkpoint_fails_before_loading(tmp_path: Path, tiny_dir: Path):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    code, err = finish(start(write_config(tmp_path / "c.yaml", tiny_dir, out), preexec_fn=limit))
    assert code == 2 and "the file size limit (ulimit -f) is 50,000 bytes" in one_error_line(err)
    assert "Load model" not in err and not out.exists() and leftovers(out) == []


def test_disk_full_is_one_line_even_for_a_warn_hook(tmp_path: Path, tiny_dir: Path, previous: Path):
    before = tree_digest(previous)
    hook = fault("after_save", "enospc", tmp_path) | {"on_error": "warn"}
    config = write_config(
        tmp_path / "full.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=[hook]
    )
    code, err = finish(start(config))
    line = one_error_line(err)
    assert code == 2 and f"output.dir {previous}: no space left on the device (ENOSPC)" in line
    assert tree_digest(previous) == before and leftovers(previous) == []


def without_root_write_override() -> None:
    """Make directory permissions bind this process even as root (who otherwise writes anywhere).

    Drops CAP_DAC_OVERRIDE from the capability bounding set before exec, so the new interpreter runs
    without it; as any other user the permissions already bind.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_read_only_output_directory_fails_before_loading(tmp_path: Path, tiny_dir: Path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    config = write_config(tmp_path / "ro.yaml", tiny_dir, locked / "out")
    code, err = finish(start(config, preexec_fn=without_root_write_override))
    line = one_error_line(err)
    assert code == 2 and f"output.dir {locked / 'out'}: {locked} is not writable" in line
    assert "Load model" not in err and list(locked.iterdir()) == []


def test_outputs_get_the_users_umask(tmp_path: Path, tiny_dir: Path):
    out = tmp_path / "out"
    code, err = finish(
        start(write_config(tmp_path / "u.yaml", tiny_dir, out), preexec_fn=lambda: os.umask(0o027))
    )
    assert code == 0, err[-3000:]
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["."] == 0o750 and modes["models"] == 0o750 and modes["analysis"] == 0o750
    files = {name: mode for name, mode in modes.items() if (out / name).is_file()}
    assert "run.json" in files and "analysis/model_comparison.json" in files
    assert set(files.values()) == {0o640}, files


# -- hooks that end the run --------------------------------------------------------------------------


def test_sys_exit_in_a_hook_is_a_failure_and_publishes_nothing(
    tmp_path: Path, tiny_dir: Path, previous: Path
):
    before = tree_digest(previous)
    hooks = [fault("after_prune", "exit", tmp_path)]
    config = write_config(tmp_path / "exit.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=hooks)
    code, err = finish(start(config))
    line = one_error_line(err)
    assert code == 1 and "failed at after_prune: it called sys.exit(0)" in line
    assert tree_digest(previous) == before and leftovers(previous) == []


def test_keyboard_interrupt_from_a_warn_hook_still_stops_the_run(tmp_path: Path, tiny_dir: Path):
    out = tmp_path / "out"
    hook = fault("after_prune", "interrupt", tmp_path) | {"on_error": "warn"}
    code, err = finish(start(write_config(tmp_path / "k.yaml", tiny_dir, out, hooks=[hook])))
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert not out.exists() and leftovers(out) == []


# -- overwrite -----------------------------------------------------------------------------------------


def test_overwrite_refuses_user_files_inside_the_run(tmp_path: Path, tiny_dir: Path, previous: Path, capsys):
    (previous / "models" / "my-llama").mkdir()
    (previous / "models" / "my-llama" / "config.json").write_text("{}")
    (previous / "models" / "my_notes.txt").write_text("mine")
    before = tree_digest(previous)
    config = write_config(tmp_path / "o.yaml", tiny_dir, previous, output={"overwrite": True})
    assert main(["--config", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "models/my-llama/ (not written by a pruning run)" in line and "models/my_notes.txt" in line
    assert tree_digest(previous) == before


def test_overwrite_replaces_the_previous_run_file_for_file(tmp_path: Path, tiny_dir: Path, previous: Path):
    old_files = set(json.loads((previous / "run.json").read_text())["files"])
    config = write_config(
        tmp_path / "o.yaml", tiny_dir, previous, output={"overwrite": True}, hooks=[], pruning={"ratio": 0.3}
    )
    assert main(["--config", str(config)]) == 0
    record = reports.load(previous / "run.json")
    on_disk = {str(p.relative_to(previous)) for p in previous.rglob("*") if p.is_file()} - {"run.json"}
    assert set(record["files"]) == on_disk and record["target_ratio"] == 0.3
    assert not any(name.startswith("analysis/") for name in on_disk)  # this run had no analysis hook
    assert {name for name in old_files if name.startswith("analysis/")}  # ...the previous one had


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs a private mount namespace (unshare -m) for a small disk"
)
def test_a_really_full_disk_leaves_the_previous_run_intact(
    tmp_path: Path, tiny_dir: Path, finished_run: Path
):
    """A 32 MB tmpfs holds the previous run; a hook fills it after pruning, so the save meets ENOSPC."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    out = disk / "out"
    hooks = [fault("after_prune", "fill", tmp_path, fill=str(disk / "filler"))]
    config = write_config(tmp_path / "full.yaml", tiny_dir, out, output={"overwrite": True}, hooks=hooks)
    script = (
        f"mount -t tmpfs -o size=32m tmpfs {disk} && cp -a {finished_run} {out} && "
        f"{sys.executable} {SCRIPT} --config {config} 2> {tmp_path / 'err'}; "
        f"echo $? > {tmp_path / 'code'}; rm -f {disk / 'filler'}; cp -a {disk} {after}"
    )
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, timeout=TIMEOUT_S, check=True)
    line = one_error_line((tmp_path / "err").read_text())
    assert (tmp_path / "code").read_text().strip() == "2"
    assert "no space left on the device (ENOSPC)" in line and "nothing was published" in line
    assert tree_digest(after / "out") == tree_digest(finished_run)
    assert sorted(p.name for p in after.iterdir()) == ["out"]  # no staging directory, no lock left


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private mount namespace (unshare -m) for a mount")
def test_a_bind_mounted_output_dir_is_refused_before_loading(tmp_path: Path, tiny_dir: Path):
    """``os.path.ismount`` misses a bind mount on the same filesystem; a rename over it fails with EBUSY."""
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    config = write_config(tmp_path / "b.yaml", tiny_dir, out)
    script = f"mount --bind {source} {out} && exec {sys.executable} {SCRIPT} --config {config}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and f"output.dir {out} is a mount point" in one_error_line(result.stderr)
    assert "Load model" not in result.stderr


def test_a_source_truncated_after_loading_cannot_kill_an_in_memory_run(tmp_path: Path, tiny_dir: Path):
    """Finding 11: transformers maps the safetensors, so the model lived in the source's pages and a
    truncated source killed the run with SIGBUS, no message. The weights are read, not mapped: the
    process holds no mapping of the source, and truncating it changes nothing."""
    model = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    code = (
        "import os, torch\n"
        "from pruning.config import ModelConfig\n"
        "from pruning.source.loading import load_model_and_tokenizer\n"
        "from pruning.storage.file_pages import safetensors_mappings\n"
        f"config = ModelConfig(path={str(model)!r}, dtype='float32', device_map='cpu')\n"
        f"loaded = load_model_and_tokenizer(config, {str(model)!r})\n"
        "assert safetensors_mappings() == [], safetensors_mappings()\n"
        f"os.truncate({str(model / 'model.safetensors')!r}, 0)\n"
        "total = sum(float(p.double().sum()) for p in loaded.model.parameters())\n"
        "logits = loaded.model(torch.tensor([[1, 2, 3]])).logits\n"
        "print('ok', torch.isfinite(logits).all().item())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "ok True"
