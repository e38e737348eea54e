"""``python -m pruning.analysis`` as a user runs it: reports, files, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pruning import reports
from tests.conftest import config_dir


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pruning.analysis", *args], capture_output=True, text=True)


def test_llama2_numbers(tmp_path: Path):
    out = tmp_path / "a.json"
    result = run("--model_path", str(config_dir("llama-2-7b")), "--verbose", "--save_json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Total parameters: 6,738,415,616" in result.stdout
    assert "Layer 31: 202,383,360  Attention 67,108,864 (32Q:32KV)" in result.stdout
    saved = reports.load(out)
    assert saved["total_params"] == 6_738_415_616 and saved["model_name"] == "llama-2-7b"


def test_compare_and_validate(tmp_path: Path, hand_pruned_dir: Path):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "dense")
    out = tmp_path / "cmp.json"
    result = run(
        "--model_path",
        str(tmp_path / "dense"),
        "--model_name",
        "原始模型",
        "--compare_with",
        str(hand_pruned_dir),
        "--compare_name",
        "剪枝后模型",
        "--save_json",
        str(out),
        "--lang",
        "zh",
        "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert "详细对比报告" in result.stdout and "头数: 4Q:2KV → 2Q:1KV" in result.stdout
    assert "Layer  2 [完全剪空]:" in result.stdout and "完全剪空的层 (1个): [2]" in result.stdout
    comparison = json.loads(out.read_text())
    assert comparison["original_name"] == "原始模型" and comparison["zero_layers"] == [2]

    ok = run("--validate", str(out))
    assert ok.returncode == 0 and "valid" in ok.stdout
    comparison["layers"][0]["total"]["original"] = "x"
    out.write_text(json.dumps(comparison))
    bad = run("--validate", str(out))
    assert bad.returncode == 1 and "$.layers[0].total.original" in bad.stderr


def _assert_clean_failure(result: subprocess.CompletedProcess, needle: str, out: Path) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_path(tmp_path: Path):
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(tmp_path / "missing"), "--save_json", str(out)),
        "missing: no such file or directory",
        out,
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{oops", "config.json: not valid JSON"),
        ('{"model_type": "florp"}', "unsupported architecture 'florp'"),
    ],
)
def test_bad_config(tmp_path: Path, content: str, needle: str):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(content)
    out = tmp_path / "o.json"
    _assert_clean_failure(run("--model_path", str(tmp_path / "m"), "--save_json", str(out)), needle, out)


def test_unreadable_config(tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(tmp_path / "m"), "--save_json", str(out)), "config.json", out
    )


def test_truncated_safetensors(tmp_path: Path, hand_pruned_dir: Path):
    file = hand_pruned_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(hand_pruned_dir), "--save_json", str(out)),
        "model.safetensors: truncated",
        out,
    )


def test_layer_count_mismatch(tmp_path: Path):
    out = tmp_path / "o.json"
    result = run(
        "--model_path",
        str(config_dir("llama-2-7b")),
        "--compare_with",
        str(config_dir("qwen2.5-7b")),
        "--save_json",
        str(out),
    )
    _assert_clean_failure(result, "different layer counts", out)


def test_pickle_needs_opt_in(tmp_path: Path):
    import torch

    from tests.conftest import build_hand_pruned

    path = tmp_path / "pruned_model.bin"
    torch.save(build_hand_pruned(), path)
    out = tmp_path / "o.json"
    _assert_clean_failure(run("--model_path", str(path), "--save_json", str(out)), "--trust-pickle", out)
    trusted = run("--model_path", str(path), "--trust-pickle")
    assert trusted.returncode == 0 and "Total parameters" in trusted.stdout


def test_debug_shows_traceback(tmp_path: Path):
    result = run("--model_path", str(tmp_path / "missing"), "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr
