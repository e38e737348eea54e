"""``python run_global_pruning.py`` as a user runs it: one-line errors, --dry-run, the documented hook."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_pipeline import REPO, build_tiny_model_dir, tree_digest, write_config

SCRIPT = REPO / "run_global_pruning.py"
LLAMA2_CONFIG_DIR = REPO / "tests" / "fixtures" / "configs" / "llama-2-7b"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def valid_config(out: Path) -> dict:
    return {
        "model": {"path": str(LLAMA2_CONFIG_DIR)},
        "pruning": {"ratio": 0.2},
        "output": {"dir": str(out)},
    }


def mutated(out: Path, section: str | None, key: str, value: object) -> dict:
    config = valid_config(out)
    target = config if section is None else config[section]
    if value is None:
        del target[key]
    else:
        target[key] = value
    return config


@pytest.mark.parametrize(
    ("section", "key", "value", "needles"),
    [
        (None, "colour", "red", ("(top level)", "'colour' was unexpected")),
        ("pruning", "ratio", 1.5, ("pruning.ratio: 1.5 is greater than or equal to the maximum of 1",)),
        (None, "model", None, ("'model' is a required property",)),
        ("model", "path", "/nonexistent/model-dir", ("model.path:", "/nonexistent/model-dir")),
    ],
    ids=["unknown-key", "ratio-1.5", "missing-model", "nonexistent-model-path"],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, section, key, value, needles):
    out = tmp_path / "out"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(mutated(out, section, key, value)), encoding="utf-8")
    assert_one_line_error(cli("--config", str(config)), *needles)
    assert not out.exists()


def test_nonexistent_config_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    line = assert_one_line_error(cli("--config", str(missing)))
    assert line == f"error: {missing}: config file not found"
    assert sorted(tmp_path.iterdir()) == []


def test_error_names_the_config_file(tmp_path: Path):
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump(mutated(tmp_path / "out", "pruning", "ratio", 1.5)), encoding="utf-8")
    line = assert_one_line_error(cli("--config", str(config)))
    assert line == f"error: {config}: pruning.ratio: 1.5 is greater than or equal to the maximum of 1"


def test_debug_shows_the_traceback(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(mutated(tmp_path / "out", None, "colour", "red")), encoding="utf-8")
    result = cli("--config", str(config), "--debug")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "UserError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_is_left_alone(tmp_path: Path, tiny_dir: Path):
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "run.json").write_text('{"previous": true}')
    (out / "models" / "keep.txt").write_text("old")
    before = tree_digest(out)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    config = write_config(tmp_path / "cfg.yaml", tiny_dir, out)
    assert_one_line_error(cli("--config", str(config)), f"output.dir {out} exists and is not empty")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    assert tree_digest(out) == before


def test_output_dir_flag_overrides_the_config(tmp_path: Path, tiny_dir: Path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    config = write_config(tmp_path / "cfg.yaml", tiny_dir, tmp_path / "fresh")
    assert_one_line_error(cli("--config", str(config), "--output-dir", str(busy)), f"output.dir {busy}")
    assert not (tmp_path / "fresh").exists()


def test_dry_run_llama2_writes_nothing():
    watched = [REPO / "results" / "llama2_0.2", LLAMA2_CONFIG_DIR]
    before = [tree_digest(p) for p in watched]
    existed = watched[0].exists()
    result = cli(
        "--dry-run",
        "--config",
        "configs/llama2_0.2.yaml",
        "--set",
        "model.path=tests/fixtures/configs/llama-2-7b",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "load -> tokenize -> score -> plan -> prune -> save" in out
    assert "events before_prune, after_prune, after_save" in out
    assert "128 windows x 512 tokens" in out
    assert "(llama, 32 layers, 32Q:32KV heads, 6,738,415,616 parameters, bfloat16 on device_map auto)" in out
    assert "remove 20.00% of total parameters = 1,347,683,123" in out
    assert "memory:      12.55 GiB of weights in bfloat16; " in out  # 6,738,415,616 x 2 bytes
    assert "hooks:       analysis" in out
    assert [tree_digest(p) for p in watched] == before and watched[0].exists() == existed


def test_dry_run_checks_the_calibration_file(tmp_path: Path):
    result = cli(
        "--dry-run",
        "--config",
        "configs/llama2_0.2.yaml",
        "--set",
        f"model.path={LLAMA2_CONFIG_DIR}",
        "--set",
        "calibration.source=data/missing.raw",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert_one_line_error(result, "calibration.source: file not found: data/missing.raw")
    assert not (tmp_path / "out").exists()


def readme_hook_module() -> str:
    text = (REPO / "docs" / "hooks.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# my_hooks.py\n")]
    assert len(blocks) == 1
    return blocks[0]


def test_readme_hook_example(tmp_path: Path, tiny_dir: Path):
    (tmp_path / "my_hooks.py").write_text(readme_hook_module(), encoding="utf-8")
    out = tmp_path / "out"
    hooks = ["analysis", {"name": "my_hooks:EventLog", "params": {"path": "events.jsonl"}}]
    config = write_config(tmp_path / "cfg.yaml", tiny_dir, out, hooks=hooks)
    result = cli("--config", str(config), cwd=tmp_path)  # the script by absolute path, cwd elsewhere
    assert result.returncode == 0, result.stderr[-3000:]

    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["before_prune", "after_prune", "after_save"]
    before, after_prune, after_save = (e["params"] for e in events)
    assert before > after_prune == after_save
    record = json.loads((out / "run.json").read_text())
    assert (before, after_prune) == (record["params_before"], record["params_after"])
    assert "Detailed comparison report" in result.stderr  # the analysis hook ran too
    assert (out / "analysis" / "model_comparison.json").is_file()


@pytest.mark.parametrize(
    ("config", "fixture", "summary"),
    [
        ("phi3_mini_0.2", "phi-3-mini-4k", "(phi3, 32 layers, 32Q:32KV heads, 3,821,079,552 parameters"),
        ("gemma2_2b_0.2", "gemma-2-2b", "(gemma2, 26 layers, 8Q:4KV heads, 2,614,341,888 parameters"),
        ("gemma3_1b_0.2", "gemma-3-1b", "(gemma3_text, 26 layers, 4Q:1KV heads, 999,885,952 parameters"),
    ],
)
def test_dry_run_of_every_family_config(config: str, fixture: str, summary: str, tmp_path: Path):
    """The shipped configs of the other families plan a run from config.json alone."""
    result = cli(
        "--dry-run",
        "--config",
        f"configs/{config}.yaml",
        "--set",
        f"model.path=tests/fixtures/configs/{fixture}",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert summary in result.stdout
    assert "remove 20.00% of total parameters" in result.stdout
    assert not (tmp_path / "out").exists()
