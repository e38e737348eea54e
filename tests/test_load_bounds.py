"""``load_pruned_model`` applies the analysis's limits before it builds anything, and every reader refuses
a safetensors header the library would refuse (reliability issue 19, findings 5, 7 and 9).

Each case is built so that a missing check would hang, allocate without bound or end in a traceback:
a billion layers, a vocabulary of a trillion, a dense size no file holds. A deadline (SIGALRM) turns a
hang into a failure; nothing here asserts a timing.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pruning.checkpoint.load import build_pruned_skeleton, load_pruned_model
from pruning.errors import UserError
from tests.conftest import HAND_PRUNED_LAYOUT, build_hand_pruned, save_with_layout

DEADLINE_S = 30  # every case answers in milliseconds; a missing bound runs for minutes or forever


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {DEADLINE_S} s: a bound is missing")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-pruned tiny Llama (hidden 64, 4 heads, 2 KV heads, head_dim 16, 4 layers, a layout)."""
    return save_with_layout(build_hand_pruned(), tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense Llama with a tokenizer: what the pipeline, its dry run and the analysis all read."""
    from tests.tiny_pipeline import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("dense") / "model")


def _edited(source: Path, directory: Path, changes: dict[str, Any]) -> Path:
    """A copy of ``source`` whose config.json has ``changes`` (a value of None removes the key)."""
    shutil.copytree(source, directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    config_file.write_text(json.dumps(config))
    return directory


def _zero_layout(layers: int) -> dict[str, Any]:
    """Every block of every layer removed: nothing stored vouches for (or against) the layer count."""
    zeros = [0] * layers
    return {
        "version": 1,
        "num_attention_heads": zeros,
        "num_key_value_heads": zeros,
        "intermediate_size": zeros,
    }


def _refused(directory: Path, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        load_pruned_model(directory)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- config.json: the analysis's limits, before anything is built ------------------------------------

CONFIG_CASES: dict[str, tuple[dict[str, Any], str]] = {
    # [x] * 10**9 per-layer sizes before the check: 8 GB of list, then a billion layers of shapes
    "a-billion-layers": (
        {"num_hidden_layers": 10**9, "pruning_layout": None},
        "key 'num_hidden_layers' is 1,000,000,000; at most 10,000",
    ),
    # a consistent layout of 100,000 empty layers: about 7 ms of skeleton each before the check
    "a-hundred-thousand-empty-layers": (
        {"num_hidden_layers": 10**5, "pruning_layout": _zero_layout(10**5)},
        "key 'num_hidden_layers' is 100,000; at most 10,000",
    ),
    "kv-heads-zero": (
        {"num_key_value_heads": 0},
        "key 'num_key_value_heads' must be a positive integer, got 0",
    ),
    "kv-heads-not-dividing": (
        {"num_key_value_heads": 3},
        "key 'num_key_value_heads' is 3, which does not divide",
    ),
    "hidden-a-string": ({"hidden_size": "64"}, "key 'hidden_size' must be a positive integer, got '64'"),
    "heads-a-bool": ({"num_attention_heads": True}, "key 'num_attention_heads' must be a positive integer"),
    "layers-a-float": ({"num_hidden_layers": 4.0}, "key 'num_hidden_layers' must be a positive integer"),
    "vocab-a-trillion": ({"vocab_size": 10**12}, "key 'vocab_size' is 1,000,000,000,000; at most 16,777,216"),
    "intermediate-absurd": (
        {"intermediate_size": 10**15},
        "key 'intermediate_size' is 1,000,000,000,000,000",
    ),
    "head-dim-absurd": ({"head_dim": 2**55}, "key 'head_dim' is 36,028,797,018,963,968; at most"),
    "head-dim-zero": ({"head_dim": 0}, "key 'head_dim' must be a positive integer, got 0"),
    "head-dim-underivable": ({"head_dim": None, "hidden_size": 2}, "key 'head_dim' is absent"),
    # surgery removes the dense model's structures one by one: 4 x 16.7 million of them before the check
    "dense-size-no-file-holds": (
        {"intermediate_size": 2**24},
        "remove 67,108,513 structures; at most 16,777,216",
    ),
    "a-layer-larger-than-the-dense-one": (
        {"pruning_layout": {**HAND_PRUNED_LAYOUT, "intermediate_size": [100, 10**30, 0, 128]}},
        f"layer 1: 0 heads, 0 KV heads and {10**30} channels cannot come from a layer of 4, 2 and 128",
    ),
    "a-value-transformers-refuses": ({"rms_norm_eps": "x"}, "is not a valid llama config"),
}


@pytest.mark.parametrize(("changes", "needle"), list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_config_values_are_refused_before_anything_is_built(
    pruned_dir: Path, tmp_path: Path, changes: dict[str, Any], needle: str
) -> None:
    model = _edited(pruned_dir, tmp_path / "model", changes)
    _refused(model, f"{model / 'config.json'}", needle)


def test_the_bound_on_removed_structures_is_inclusive(pruned_dir: Path) -> None:
    """A dense size that leaves exactly the bound's number of KV groups and channels to remove is
    accepted; one more is refused (4 layers of a 2**22-channel dense MLP, 5 KV groups removed)."""
    from pruning.checkpoint.load_checks import MAX_REMOVED_STRUCTURES, check_config

    config_file = pruned_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 2**22
    config["pruning_layout"] = {**HAND_PRUNED_LAYOUT, "intermediate_size": [1, 1, 1, 2]}
    check_config(config_file, config)  # removes 5 + 4 * 2**22 - 5 = 2**24
    config["pruning_layout"]["intermediate_size"] = [1, 1, 1, 1]
    with pytest.raises(UserError, match=f"remove {MAX_REMOVED_STRUCTURES + 1:,} structures; at most"):
        check_config(config_file, config)


def test_the_analysis_refuses_the_same_values_with_the_same_words(
    pruned_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pruning.analysis.cli import main

    for name in ("kv-heads-not-dividing", "vocab-a-trillion", "head-dim-underivable"):
        changes, needle = CONFIG_CASES[name]
        model = _edited(pruned_dir, tmp_path / name, changes)
        assert main(["--model_path", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert _refused(model) in err[0]


def test_a_config_that_disagrees_with_the_headers_is_refused_before_building(
    pruned_dir: Path, tmp_path: Path
) -> None:
    """The parameters the config implies are exactly the stored ones, compared on the headers alone."""
    bigger = _edited(pruned_dir, tmp_path / "vocab", {"vocab_size": 4096})
    _refused(bigger, "model.embed_tokens.weight is stored as [128, 64] but config.json", "needs [4096, 64]")
    untied = _edited(pruned_dir, tmp_path / "untied", {"tie_word_embeddings": False})
    _refused(untied, str(untied), "missing lm_head.weight, which config.json says the model has")


def test_the_skeleton_allocates_no_weight_even_for_a_dense_size_no_file_holds(pruned_dir: Path) -> None:
    """The dense model a layout was cut from is built before it is cut; its weights must be born on meta.
    One dense gate_proj here is 2^48 floats (a petabyte), more than any address space."""
    config = json.loads((pruned_dir / "config.json").read_text())
    config.update(hidden_size=2**24, intermediate_size=2**24, vocab_size=2, num_hidden_layers=1)
    config["pruning_layout"] = {
        "version": 1,
        "num_attention_heads": [0],
        "num_key_value_heads": [0],
        "intermediate_size": [2**24],
    }
    skeleton = build_pruned_skeleton(config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.model.layers[0].mlp.gate_proj.weight.shape == (2**24, 2**24)
    assert not skeleton.model.rotary_emb.inv_freq.is_meta


class _Payload:
    """Unpickled, it creates ``marker``: what code hidden in a pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_trusted_pickled_shards_are_still_read_without_running_code(pruned_dir: Path, tmp_path: Path) -> None:
    """``trust_pickle`` lets pickled shards be read at all, with torch's weights-only unpickler: an
    object that would run code on unpickling is refused, and its code never runs."""
    import pickle

    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(pruned_dir, tmp_path / "model"))
    state: dict[str, Any] = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": _Payload(marker)}, model / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_pruned_model(model, trust_pickle=True)
    assert not marker.exists()


# -- a safetensors header the library refuses: every reader says so in one line ---------------------


def _rewrite_header(file: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the header in place; the tensors' bytes and offsets stay as they were."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _metadata_not_strings(header: dict[str, Any]) -> None:
    header["__metadata__"] = {"format": 5}


def _a_trillion_squared_in_no_bytes(header: dict[str, Any]) -> None:
    end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
    header["model.extra"] = {"dtype": "F4", "shape": [10**12, 10**12], "data_offsets": [end, end]}


FORGED_HEADERS = {
    # passed the dry run; the run and load_pruned_model ended in SafetensorError (finding 7)
    "metadata-not-strings": (
        _metadata_not_strings,
        "corrupt safetensors header (__metadata__ 'format' is a int, not a string)",
    ),
    # the analysis counted 10^24 parameters and exited 0 (finding 9)
    "sub-byte-tensor-in-no-bytes": (
        _a_trillion_squared_in_no_bytes,
        "corrupt safetensors header (tensor 'model.extra': shape [1000000000000, 1000000000000] of F4 "
        "overflows the format's 64-bit sizes)",
    ),
}


@pytest.mark.parametrize(("edit", "needle"), list(FORGED_HEADERS.values()), ids=list(FORGED_HEADERS))
def test_a_header_the_library_refuses_is_refused_by_every_reader(
    dense_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[dict[str, Any]], None],
    needle: str,
) -> None:
    """The dry run, the run (before any weight loads), the analysis and load_pruned_model: one line each."""
    from pruning.analysis.cli import main as analyse
    from pruning.cli import main as prune
    from pruning.pipeline import run as pipeline
    from tests.tiny_pipeline import write_config

    model = Path(shutil.copytree(dense_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    _rewrite_header(weights, edit)

    def trap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the header was checked")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", trap)
    config = write_config(tmp_path / "c.yaml", model, tmp_path / "out")
    for main, argv in (
        (prune, ["--config", str(config), "--dry-run"]),
        (prune, ["--config", str(config)]),
        (analyse, ["--model_path", str(model)]),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"{weights}: {needle}" in err[0], (
            argv,
            err,
        )
    _refused(model, f"{weights}: {needle}")
