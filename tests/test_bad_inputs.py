"""Every bad input a user can give the pipeline: one line, exit code 2, before weights load, nothing written.

The runs are in-process (fast); ``load_model_and_tokenizer`` is replaced by a trap, so a check that
happened only after loading the weights fails the test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning.cli import main
from pruning.pipeline import run as pipeline
from tests.tiny_pipeline import build_tiny_model_dir, write_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def no_weights_may_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", trap)


def fails(capsys: pytest.CaptureFixture, argv: list[str], *needles: str, out: Path | None = None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    if out is not None:
        assert not out.exists() and not [
            p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
        ]
    return err[0]


def run_fails(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path, *needles: str) -> str:
    """Prune ``model`` with the default tiny config: one line naming ``needles``, nothing written."""
    out = tmp_path / "out"
    return fails(capsys, ["--config", str(write_config(tmp_path / "c.yaml", model, out))], *needles, out=out)


def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


# -- the source model's files ------------------------------------------------------------------------


def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:-100])


def _lie(weights: Path) -> None:
    """Keep the bytes, claim another shape: the header's shape no longer fits its byte range."""
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [32]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    weights.write_bytes(raw[:8] + text + raw[8 + n :])


def _reshape(weights: Path) -> None:
    state = load_file(weights)
    state["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(100, 64)
    save_file(state, weights, metadata={"format": "pt"})


def _drop(weights: Path) -> None:
    state = load_file(weights)
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncate, "truncated safetensors file"),
        (_lie, "safetensors header lies about 'model.norm.weight'"),
        (_reshape, "model.layers.1.mlp.gate_proj.weight is stored as [100, 64], config.json needs [128, 64]"),
        (_drop, "weights lack model.layers.2.self_attn.k_proj.weight"),
    ],
    ids=["truncated", "lying-header", "wrong-shape", "missing-tensor"],
)
def test_broken_source_weights(tmp_path: Path, tiny_dir: Path, capsys, damage, needle: str):
    model = model_copy(tiny_dir, tmp_path)
    damage(model / "model.safetensors")
    run_fails(capsys, tmp_path, model, "model.path: ", needle)


def test_index_pointing_at_a_pickle_is_refused_before_loading(tmp_path: Path, tiny_dir: Path, capsys):
    """(That transformers never gets to ``torch.load`` it: ``test_pipeline.py``, which spies on it.)"""
    model = model_copy(tiny_dir, tmp_path)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": dict.fromkeys(state, "pytorch_model.bin")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(capsys, tmp_path, model, "points at pickled weights (pytorch_model.bin)", "trust_pickle")


def test_heads_that_do_not_divide_into_kv_groups(tmp_path: Path, tiny_dir: Path, capsys):
    model = model_copy(tiny_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (model / "config.json").write_text(json.dumps(config))
    run_fails(capsys, tmp_path, model, "4 attention heads for 3 KV heads")


# -- config values checked against the model (also by --dry-run) -------------------------------------


CONFIG_VS_MODEL = {
    "protected": (
        {"pruning": {"protected_layers": [1, 7]}},
        "pruning.protected_layers: [7] out of range: the model has layers 0..3",
    ),
    "min-kv": ({"pruning": {"min_kv_groups": 3}}, "pruning.min_kv_groups: 3 is more than the 2 KV groups"),
    "min-channels": (
        {"pruning": {"min_channels": 129}},
        "pruning.min_channels: 129 is more than the 128 MLP channels",
    ),
    "unreachable": (
        {"pruning": {"ratio": 0.5, "protected_layers": [0, 1, 2]}},
        "pruning.ratio: cannot remove 50.00% of total",
    ),
    "seq-len": (
        {"calibration": {"seq_len": 256}},
        "calibration.seq_len: 256 is longer than the model's max_position_embeddings (128)",
    ),
    "tokens": (
        {"calibration": {"num_samples": 1_000_000, "seq_len": 128}},
        "calibration.num_samples: 1,000,000 windows x 128",
    ),
    "num-samples": (
        {"calibration": {"num_samples": 10**7}},
        "calibration.num_samples: 10000000 is greater than the maximum of 1000000",
    ),
    "seed": (
        {"calibration": {"seed": 2**64}},
        "calibration.seed: 18446744073709551616 is greater than the maximum",
    ),
    "nan": ({"pruning": {"ratio": float("nan")}}, "pruning.ratio: must be a finite number"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("sections", "needle"), list(CONFIG_VS_MODEL.values()), ids=list(CONFIG_VS_MODEL))
def test_config_checked_against_the_model(tmp_path: Path, tiny_dir: Path, capsys, sections, needle, dry_run):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_dir, out, **sections)
    fails(capsys, ["--config", str(config), *(["--dry-run"] if dry_run else [])], needle, out=out)


def test_nan_ratio_from_the_command_line(tmp_path: Path, tiny_dir: Path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_dir, out)
    fails(
        capsys,
        ["--config", str(config), "--dry-run", "--set", "pruning.ratio=.nan"],
        "pruning.ratio: must be a finite number",
    )


def test_duplicate_yaml_key(tmp_path: Path, tiny_dir: Path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_dir, out)
    text = config.read_text().replace("  ratio: 0.2\n", "  ratio: 0.2\n  ratio: 0.9\n")
    config.write_text(text)
    fails(
        capsys,
        ["--config", str(config)],
        f"{config}: not valid YAML at line",
        "duplicate key 'ratio'",
        out=out,
    )


def test_empty_output_dir_flag(tmp_path: Path, tiny_dir: Path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_dir, tmp_path / "out")
    fails(capsys, ["--config", str(config), "--output-dir", ""], "--output-dir: must not be empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# -- hooks -----------------------------------------------------------------------------------------


BAD_HOOKS = {
    "misspelt-event": (
        "tests.hook_points:Misspelt",
        "method 'after_prun' looks like an event but is not one (did you mean 'after_prune'?)",
    ),
    "constructor-raises": (
        "tests.hook_points:BrokenConstructor",
        "its constructor raised RuntimeError: cannot reach the metrics server",
    ),
}


@pytest.mark.parametrize(("hook", "needle"), list(BAD_HOOKS.values()), ids=list(BAD_HOOKS))
def test_bad_hooks_fail_before_loading(tmp_path: Path, tiny_dir: Path, capsys, hook: str, needle: str):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_dir, out, hooks=[hook])
    fails(capsys, ["--config", str(config)], f"hooks: hooks[0] {hook}: ", needle, out=out)


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"head_dim": "x"}, "config.json key 'head_dim' must be a positive integer, got 'x'"),
        ({"max_position_embeddings": "x"}, "key 'max_position_embeddings' must be a positive integer"),
        ({"rms_norm_eps": "x"}, "config.json is not a valid llama config: Validation error for field"),
        ({"num_hidden_layers": 2}, "the weights hold model.layers.2."),
        ({"num_hidden_layers": 10**8}, "key 'num_hidden_layers' is 100,000,000; at most 10,000"),
    ],
    ids=["head-dim", "max-positions", "strict-field", "fewer-layers-than-weights", "absurd-depth"],
)
def test_config_json_values(tmp_path: Path, tiny_dir: Path, capsys, changes: dict, needle: str):
    model = model_copy(tiny_dir, tmp_path)
    _edit_config(model, **changes)
    run_fails(capsys, tmp_path, model, "model.path: ", needle)


def _other_file_lacking_a_tensor(model: Path) -> str:
    state = load_file(model / "model.safetensors")
    del state["model.layers.3.mlp.down_proj.weight"]
    save_file(state, model / "other.safetensors", metadata={"format": "pt"})
    return "other.safetensors"


@pytest.mark.parametrize(
    ("redirect", "needle"),
    [
        (_other_file_lacking_a_tensor, "weights lack model.layers.3.mlp.down_proj.weight"),
        (lambda model: "adapter_model.bin", "names transformers_weights adapter_model.bin, which is missing"),
    ],
    ids=["safetensors", "missing"],
)
def test_config_json_naming_other_weights_is_followed(
    tmp_path: Path, tiny_dir: Path, capsys, redirect, needle
):
    """transformers loads the file ``transformers_weights`` names: the checks look at that file too."""
    model = model_copy(tiny_dir, tmp_path)
    _edit_config(model, transformers_weights=redirect(model))
    run_fails(capsys, tmp_path, model, needle)


def test_single_file_beats_the_index_as_in_transformers(tmp_path: Path, tiny_dir: Path, capsys):
    """With both present transformers loads model.safetensors, so that is the file checked."""
    model = model_copy(tiny_dir, tmp_path)
    state = load_file(model / "model.safetensors")
    save_file(state, model / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _drop(model / "model.safetensors")
    run_fails(capsys, tmp_path, model, "weights lack")


# -- the second hostile round (issue 19): every case one line, exit 2, before any weight loads ---------


def _fifo(path: Path) -> Path:
    import os

    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
def test_a_config_that_is_not_a_regular_file(tmp_path: Path, capsys, kind: str):
    """Finding 8: a FIFO hung, /dev/zero ran out of memory."""
    if kind == "fifo":
        config = _fifo(tmp_path / "c.yaml")
    elif kind == "directory":
        (config := tmp_path / "c.yaml").mkdir()
    else:
        config = Path(kind)
    needle = "is a directory, not a config file" if kind == "directory" else "not a regular file"
    fails(capsys, ["--config", str(config), "--dry-run"], f"{config}: {needle}")


@pytest.mark.parametrize(
    ("yaml_text", "override", "needle"),
    [
        ("calibration: {seed: " + "7" * 5000 + "}", None, "not valid YAML: Exceeds the limit (4300 digits)"),
        ("", "calibration.seed=" + "7" * 5000, "value is not valid YAML"),
    ],
    ids=["in-the-file", "in---set"],
)
def test_a_5000_digit_integer_is_one_line(
    tmp_path: Path, tiny_dir: Path, capsys, yaml_text, override, needle
):
    config = write_config(tmp_path / "c.yaml", tiny_dir, tmp_path / "out")
    config.write_text(config.read_text().replace("calibration:", "calibration_was:", 1) + yaml_text)
    if override is not None:
        config = write_config(tmp_path / "c.yaml", tiny_dir, tmp_path / "out")
    message = fails(capsys, ["--config", str(config), *(["--set", override] if override else [])], needle)
    assert len(message) < 600


def _mix_config(tmp_path: Path, tiny_dir: Path, out: Path, sources: list[dict]) -> Path:
    import yaml

    config = write_config(tmp_path / "c.yaml", tiny_dir, out)
    data = yaml.safe_load(config.read_text())
    del data["calibration"]["source"]
    data["calibration"]["sources"] = sources
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_an_infinite_calibration_weight(tmp_path: Path, tiny_dir: Path, capsys, dry_run: bool):
    """Finding 7: ``.inf`` passed validation (exclusiveMinimum 0) and crashed after loading."""
    out = tmp_path / "out"
    sources = [
        {"source": "builtin:python-code", "weight": float("inf")},
        {"source": "builtin:python-docs", "weight": 1.0},
    ]
    config = _mix_config(tmp_path, tiny_dir, out, sources)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, "calibration.sources[0].weight: must be a finite number", out=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_weight_that_rounds_to_no_window_fails_before_loading(tmp_path, tiny_dir, capsys, dry_run):
    out = tmp_path / "out"
    sources = [
        {"source": "builtin:python-code", "weight": 1.0},
        {"source": "builtin:python-docs", "weight": 1e-9},
    ]
    config = _mix_config(tmp_path, tiny_dir, out, sources)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(
        capsys,
        argv,
        "calibration.sources: builtin:python-docs (weight 1e-09) gets no window of the 4",
        out=out,
    )


def _text_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    contents = {"empty": b"", "blank": b" \n\n \t\n", "short": b"Just a few words.", "binary": bytes(4096)}
    if kind == "not-utf8":
        path.write_bytes(b"\xff\xfe" * 2048)
    else:
        path.write_bytes(contents[kind])
    return path


TEXT_PROBLEMS = {
    "empty": "is empty",
    "blank": "is empty",
    "short": "has 17 bytes, fewer than the",
    "binary": "is binary, not text (it holds control characters)",
    "not-utf8": "is not UTF-8 text (byte 0)",
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind", list(TEXT_PROBLEMS))
def test_a_calibration_text_that_cannot_give_a_window(tmp_path, tiny_dir, capsys, kind: str, dry_run: bool):
    out = tmp_path / "out"
    text = _text_file(tmp_path, kind)
    config = write_config(tmp_path / "c.yaml", tiny_dir, out, calibration={"source": str(text)})
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, "calibration.source: ", TEXT_PROBLEMS[kind], out=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind", [*TEXT_PROBLEMS, "fifo"])
def test_a_perplexity_text_that_cannot_give_a_window(tmp_path, tiny_dir, capsys, kind: str, dry_run: bool):
    """Finding 12: these failed as a hook error (exit 1) after the model had loaded."""
    out = tmp_path / "out"
    text = _fifo(tmp_path / "t.txt") if kind == "fifo" else _text_file(tmp_path, kind)
    hooks = [{"name": "perplexity", "params": {"text": str(text), "protocol": "paper-128"}}]
    config = write_config(tmp_path / "c.yaml", tiny_dir, out, hooks=hooks)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    needle = "not a regular file" if kind == "fifo" else TEXT_PROBLEMS[kind]
    fails(capsys, argv, "hooks: hooks[0] perplexity: ", needle, out=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_disk_placement_with_streaming_never(tmp_path: Path, tiny_dir: Path, capsys, dry_run: bool):
    """Finding 10: the dry run said OK, the run refused after reading the config."""
    out = tmp_path / "out"
    model = {"device_map": {"": "disk"}, "streaming": "never"}
    config = write_config(tmp_path / "c.yaml", tiny_dir, out, model=model)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, "model.streaming is never, but model.device_map puts the model on disk", out=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_directory_at_the_lock_path(tmp_path: Path, tiny_dir: Path, capsys, dry_run: bool):
    """Finding 7: IsADirectoryError, a traceback, on every run until the user found the directory."""
    out = tmp_path / "out"
    (tmp_path / ".out.lock").mkdir()
    config = write_config(tmp_path / "c.yaml", tiny_dir, out)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, f"the lock file {tmp_path / '.out.lock'} is a directory; remove it")
    assert (tmp_path / ".out.lock").is_dir() and not out.exists()


def test_a_multiple_of_above_the_mlp_size_is_a_warning(tmp_path: Path, tiny_dir: Path, capsys, caplog):
    """Finding 13: multiple_of 256 on a 128-channel MLP removed 34.9% for a 20% target, silently."""
    config = write_config(tmp_path / "c.yaml", tiny_dir, tmp_path / "out", pruning={"multiple_of": 256})
    assert main(["--config", str(config), "--dry-run"]) == 0
    assert "pruning.multiple_of: 256 is more than the 128 MLP channels each layer has" in caplog.text


WEIGHTS_NOT_A_FILE = {
    "fifo": "model.safetensors: is a FIFO, device or socket, not a weights file",
    "directory": "model.safetensors: is a directory, not a weights file",
    "link-to-dev-zero": "model.safetensors: is a FIFO, device or socket, not a weights file",
    "dangling-link": "model.safetensors: is a symbolic link to ",
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind", list(WEIGHTS_NOT_A_FILE))
def test_weights_that_are_not_a_file(tmp_path: Path, tiny_dir: Path, capsys, kind: str, dry_run: bool):
    """Finding 10: the dry run skipped such a model.safetensors and said OK; the run found no weights."""
    import os

    model = model_copy(tiny_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)
    elif kind == "directory":
        weights.mkdir()
    else:
        weights.symlink_to("/dev/zero" if kind == "link-to-dev-zero" else tmp_path / "nowhere")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", model, out)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, f"model.path: {weights}", WEIGHTS_NOT_A_FILE[kind], out=out)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_fifo_among_the_model_files(tmp_path: Path, tiny_dir: Path, capsys, dry_run: bool):
    """transformers opens tokenizer.json itself: a FIFO there blocked the run for ever."""
    import os

    model = model_copy(tiny_dir, tmp_path)
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", model, out)
    argv = ["--config", str(config), *(["--dry-run"] if dry_run else [])]
    fails(capsys, argv, f"model.path: {model / 'tokenizer.json'} is a FIFO, device or socket", out=out)


def test_a_number_too_long_in_a_safetensors_header(tmp_path: Path, tiny_dir: Path, capsys):
    model = model_copy(tiny_dir, tmp_path)
    header = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}"
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    run_fails(capsys, tmp_path, model, "model.safetensors: corrupt safetensors header (ValueError)")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_source_in_a_dtype_torch_has_not(tmp_path: Path, tiny_dir: Path, capsys, dry_run: bool):
    """F4 passes the header check (a real safetensors dtype), but torch cannot hold it: say so first."""
    model = model_copy(tiny_dir, tmp_path)
    header = b'{"model.norm.weight": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}'
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    out = tmp_path / "out"
    argv = [
        "--config",
        str(write_config(tmp_path / "c.yaml", model, out)),
        *(["--dry-run"] if dry_run else []),
    ]
    fails(capsys, argv, "model.norm.weight is stored as F4, which torch cannot hold", out=out)
