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


# -- trust nothing on input ---------------------------------------------------------------------------


def _sharded(tmp_path: Path) -> Path:
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    directory = tmp_path / "sharded"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory, max_shard_size="60KB")
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    return directory


def test_missing_shard_is_refused_not_reported_as_pruned(tmp_path: Path):
    directory = _sharded(tmp_path)
    complete = run("--model_path", str(directory))
    assert complete.returncode == 0 and "fully pruned" not in complete.stdout
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(directory), "--save_json", str(out)), f"shard {shard.name} is missing", out
    )


def test_header_that_lies_about_a_shape_is_refused(tmp_path: Path, hand_pruned_dir: Path):
    import struct

    file = hand_pruned_dir / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [32]  # 64 floats of bytes, 32 claimed
    file.write_bytes(raw[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(n) + raw[8 + n :])
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(hand_pruned_dir), "--save_json", str(out)), "header lies about", out
    )


def test_index_pointing_at_a_pickle_needs_trust(tmp_path: Path, hand_pruned_dir: Path):
    import torch
    from safetensors.torch import load_file

    state = load_file(hand_pruned_dir / "model.safetensors")
    (hand_pruned_dir / "model.safetensors").unlink()
    torch.save(state, hand_pruned_dir / "pytorch_model.bin")
    index = {"weight_map": dict.fromkeys(state, "pytorch_model.bin")}
    (hand_pruned_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(hand_pruned_dir), "--save_json", str(out)), "points at pickled weights", out
    )
    trusted = run("--model_path", str(hand_pruned_dir), "--trust-pickle", "--lang", "en")
    assert trusted.returncode == 0 and "Total parameters" in trusted.stdout


def test_save_json_onto_a_directory(tmp_path: Path):
    (tmp_path / "taken").mkdir()
    result = run("--model_path", str(config_dir("llama-2-7b")), "--save_json", str(tmp_path / "taken"))
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == f"error: --save_json {tmp_path / 'taken'}: is a directory; give a file name"
    )
    assert list((tmp_path / "taken").iterdir()) == []


def test_save_json_into_a_read_only_directory(tmp_path: Path):
    from tests.test_reliability import without_root_write_override

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = subprocess.run(
        [sys.executable, "-m", "pruning.analysis", "--model_path", str(config_dir("llama-2-7b")),
         "--save_json", str(locked / "a.json")],
        capture_output=True, text=True, preexec_fn=without_root_write_override,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {locked / 'a.json'}: cannot write here: permission denied"
    assert list(locked.iterdir()) == []


def test_validate_a_directory_or_absurd_nesting_is_exit_2(tmp_path: Path):
    assert (
        run("--validate", str(tmp_path)).stderr.strip()
        == f"error: {tmp_path}: is a directory, not a JSON report"
    )
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    result = run("--validate", str(nested))
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: {nested}: JSON nested too deeply to be a report"
    )


def test_validate_checks_the_sums(tmp_path: Path):
    from pruning.analysis import ModelAnalyzer

    report = ModelAnalyzer(config_dir("llama-2-7b")).analyze()
    report["layers"][5]["mlp"]["total"] += 1  # the layer's total no longer adds up
    path = tmp_path / "a.json"
    path.write_text(json.dumps(report))
    result = run("--validate", str(path))
    assert (
        result.returncode == 1 and "$.layers[5].total" in result.stderr and "attention + mlp" in result.stderr
    )


def test_closed_pipe_ends_quietly():
    """``| head`` that has already gone: the report's first write meets a closed pipe."""
    args = ["--model_path", str(config_dir("llama-2-7b")), "--verbose"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pruning.analysis", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before the command writes anything
    _, err = proc.communicate(timeout=60)
    assert err == b"" and proc.returncode == 141


@pytest.mark.parametrize(
    ("lang", "title"),
    [("zh_CN.UTF-8", "模型分析"), ("en_US.UTF-8", "Model analysis"), ("C", "Model analysis")],
)
def test_language_follows_the_locale(lang: str, title: str):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES")} | {"LANG": lang}
    result = subprocess.run(
        [sys.executable, "-m", "pruning.analysis", "--model_path", str(config_dir("llama-2-7b"))],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0 and title in result.stdout


def test_comparison_with_a_larger_pruned_model_is_not_saved(tmp_path: Path):
    out = tmp_path / "cmp.json"
    result = run(
        "--model_path", str(config_dir("llama-2-7b")), "--compare_with", str(config_dir("llama-3-8b")),
        "--save_json", str(out), "--lang", "en",
    )  # fmt: skip
    assert "Detailed comparison report" in result.stdout  # the comparison is still shown
    _assert_clean_failure(result, "$.total_params.reduction_ratio", out)
    assert "cannot be larger than the original" in result.stderr


def test_tensors_missing_from_a_consistent_file_are_refused(tmp_path: Path, hand_pruned_dir: Path):
    """Layer 3 keeps everything by its layout; a file without its tensors must not read as 'fully pruned'."""
    from safetensors.torch import load_file, save_file

    file = hand_pruned_dir / "model.safetensors"
    state = {k: v for k, v in load_file(file).items() if not k.startswith("model.layers.3.")}
    save_file(state, file, metadata={"format": "pt"})
    out = tmp_path / "o.json"
    _assert_clean_failure(
        run("--model_path", str(hand_pruned_dir), "--save_json", str(out)),
        "the weights lack model.layers.3.",
        out,
    )


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"head_dim": "x"}, "key 'head_dim' must be a positive integer, got 'x'"),
        (
            {"pruning_layout": {"version": 1, "num_attention_heads": [1]}},
            "pruning_layout.num_attention_heads must be",
        ),
    ],
    ids=["head-dim", "layout"],
)
def test_bad_config_values(tmp_path: Path, hand_pruned_dir: Path, changes: dict, needle: str):
    config = json.loads((hand_pruned_dir / "config.json").read_text()) | changes
    (hand_pruned_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o.json"
    for model in (
        hand_pruned_dir,
        hand_pruned_dir / "config.json",
    ):  # from headers, and from the config alone
        _assert_clean_failure(run("--model_path", str(model), "--save_json", str(out)), needle, out)


def test_save_json_below_a_file(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text("x")
    target = tmp_path / "cfg.yaml" / "a.json"
    result = run("--model_path", str(config_dir("llama-2-7b")), "--save_json", str(target))
    assert result.returncode == 2 and result.stderr.strip().startswith(
        f"error: {target}: cannot write here: "
    )


def _gguf_export(tmp_path: Path, arch: str, plan_kind: str, dtype: str = "f32") -> tuple[Path, Path]:
    """A tiny model pruned by ``plan_kind``, saved, and exported by this package's GGUF export."""
    from pruning.export.gguf import export_gguf
    from tests.test_gguf_export import saved

    checkpoint = saved(tmp_path, arch, plan_kind)
    return checkpoint, export_gguf(checkpoint, tmp_path / f"{arch}.gguf", dtype=dtype)


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2"])
def test_gguf_export_of_a_nonuniform_model_is_counted_per_layer(tmp_path: Path, arch: str):
    """The export writes a non-uniform model as ``deci``, its head, KV-head and feed-forward counts as
    per-layer arrays. Each layer is counted as in the checkpoint, plus exactly the zero stand-ins
    docs/export.md lists (one KV group in layer 0, one channel where llama.cpp cannot skip an MLP)."""
    checkpoint, gguf_file = _gguf_export(tmp_path, arch, "nonuniform")
    reports = {}
    for name, path in (("checkpoint", checkpoint), ("gguf", gguf_file)):
        out = tmp_path / f"{name}.json"
        result = run("--model_path", str(path), "--save_json", str(out), "--verbose")
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(out.read_text())
    checkpoint_report, gguf_report = reports["checkpoint"], reports["gguf"]
    hidden, head_dim = checkpoint_report["hidden_size"], checkpoint_report["head_dim"]
    group = 2  # the tiny models' 4 heads over 2 KV heads
    last = len(checkpoint_report["layers"]) - 1
    expected, stand_ins = [], 0
    for layer in checkpoint_report["layers"]:
        idx, total, attention = layer["layer_idx"], layer["total"], layer["attention"]
        heads, kv, ff = attention["num_heads"], attention["num_kv_heads"], layer["mlp"]["intermediate_size"]
        if idx == 0 and kv == 0:  # q, k, v, o of one KV group, and the attention norm
            heads, kv, added = group, 1, (2 * group + 2) * head_dim * hidden + hidden
            total, stand_ins = total + added, stand_ins + added
        if ff == 0 and (kv or idx == last):  # gate, up, down of one channel, and the MLP norm
            ff, total, stand_ins = 1, total + 4 * hidden, stand_ins + 4 * hidden
        expected.append((heads, kv, ff, total))
    found = [
        (a["num_heads"], a["num_kv_heads"], m["intermediate_size"], layer["total"])
        for layer in gguf_report["layers"]
        for a, m in [(layer["attention"], layer["mlp"])]
    ]
    assert found == expected
    assert len({counts[:3] for counts in expected}) == len(expected)  # every layer differs: no one value fits
    assert stand_ins and gguf_report["total_params"] == checkpoint_report["total_params"] + stand_ins
    assert gguf_report["embedding_params"] == checkpoint_report["embedding_params"]
    assert gguf_report["source"] == "gguf" and checkpoint_report["source"] == "safetensors"
    assert gguf_report["model_type"] == "deci"
    assert gguf_report["layers"][1]["attention"]["type"] == "DeciLMAttention"


@pytest.mark.parametrize("plan_kind", ["uniform", "dense"])
def test_gguf_export_of_a_uniform_or_dense_model_counts_as_its_checkpoint(tmp_path: Path, plan_kind: str):
    """Written as plain ``llama`` with one count for every layer: the same report as the checkpoint's."""
    from pruning.analysis import ModelAnalyzer

    checkpoint, gguf_file = _gguf_export(tmp_path, "llama_gqa", plan_kind, dtype="f16")
    from_checkpoint = ModelAnalyzer(checkpoint, "m").analyze()
    from_gguf = ModelAnalyzer(gguf_file, "m").analyze()
    assert from_gguf["source"] == "gguf" and from_gguf["dtype"] == "gguf:F16"
    assert {**from_gguf, "source": "safetensors", "dtype": "float32"} == from_checkpoint


@pytest.mark.parametrize("kind", ["symlink", "fifo", "/dev/null"])
def test_save_json_writes_only_a_regular_file_or_a_new_name(tmp_path: Path, kind: str):
    """Finding 6: the atomic rename replaced a symlink, a FIFO or a device node with a plain file."""
    import os

    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    if kind == "symlink":
        (target := tmp_path / "link.json").symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(target := tmp_path / "pipe.json")
    else:
        target = Path(kind)
    result = run("--model_path", str(config_dir("llama-2-7b")), "--save_json", str(target))
    assert result.returncode == 2 and result.stdout == ""  # refused before the analysis ran
    assert (
        result.stderr.startswith(f"error: --save_json {target}: is ") and len(result.stderr.splitlines()) == 1
    )
    assert "the tool writes only a regular file or a new name" in result.stderr
    assert victim.read_text() == "keep" and (kind != "symlink" or target.is_symlink())
    assert kind != "/dev/null" or Path("/dev/null").is_char_device()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom"])
def test_validate_reads_only_a_regular_file(tmp_path: Path, kind: str):
    """Finding 8: a FIFO hung, /dev/zero and /dev/urandom ran out of memory."""
    import os

    if kind == "fifo":
        os.mkfifo(path := tmp_path / "pipe.json")
    else:
        path = Path(kind)
    result = subprocess.run(
        [sys.executable, "-m", "pruning.analysis", "--validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {path}: not a regular file (a FIFO, device or socket); give a JSON report file"
    )


def test_validate_a_5000_digit_number_is_one_line(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text('{"report_type": "model_analysis", "total_params": ' + "9" * 5000 + "}")
    result = run("--validate", str(path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {path}: holds a number too long to be read (Exceeds the limit")
