"""Pruned checkpoints load in plain transformers: layers that differ through the modeling code shipped
with the checkpoint (``trust_remote_code=True``), uniform ones as stock checkpoints; the same model as
``load_pruned_model`` builds, also where this package is not installed."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, dynamic_module_utils

from pruning.analysis import ModelAnalyzer
from pruning.checkpoint.config_json import (
    AUTO_MAP,
    BLOCKS_KEY,
    REMOTE_CODE_FILE,
    pruned_format,
    remote_code_source,
    write_remote_code,
)
from pruning.checkpoint.load import load_pruned_model
from pruning.checkpoint.save import save_pruned_model
from pruning.families import KINDS, adapter_for, check_supported
from pruning.families.layout import LAYOUT_KEY, LAYOUT_VERSION
from pruning.families.shape_rules import compare_to_config
from pruning.storage.weight_files import find_weight_files, stored_tensors
from pruning.surgery import apply_plan, pruned_layout
from tests.tiny_models import ARCHS, NUM_LAYERS, input_ids, make_plan, tiny_model, uniformly_pruned

SOURCE = Path(__file__).parent.parent / "pruning" / "checkpoint" / REMOTE_CODE_FILE


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """transformers copies remote code into HF_MODULES_CACHE (and puts it on sys.path): a temporary one
    here, so that nothing is written to the user's home."""
    cache = tmp_path_factory.mktemp("hf_modules")
    saved_path = sys.path[:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
        yield cache
    sys.path[:] = saved_path


def _pruned(arch: str, impl: str = "eager") -> nn.Module:
    """make_plan: layer 0 loses its attention, layer 2 everything, layer 3 its MLP, others a part."""
    model = tiny_model(arch, impl)
    apply_plan(model, make_plan(model))
    return model


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, two of them left-padded (pad id 0), and their attention mask."""
    ids = input_ids(batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _assert_same_logits(model: nn.Module, reference: nn.Module, atol: float = 1e-5) -> None:
    """Equal logits at batch size 1, and at batch size 3 with padding (compared where the mask is 1)."""
    ids, mask = _padded_batch()
    with torch.no_grad():
        one = ids[:1]
        torch.testing.assert_close(model(one).logits, reference(one).logits, atol=atol, rtol=0)
        got = model(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=atol, rtol=0)


def _greedy(model: nn.Module) -> torch.Tensor:
    ids = input_ids()  # 10 tokens, then 12 more: past the tiny models' sliding window of 8
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        return model.generate(ids, use_cache=True, **kwargs)


def _stock_type(model: nn.Module) -> str:
    return check_supported(model.config)


# -- layers that differ: the shipped modeling code --------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_remote_code_builds_the_model_load_pruned_model_builds(
    arch: str, tmp_path: Path, modules_cache: Path
) -> None:
    model = _pruned(arch)
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    stock = _stock_type(model)
    assert config["model_type"] == f"pruned_{stock}" and config["auto_map"] == AUTO_MAP
    assert config[LAYOUT_KEY] == pruned_layout(model).to_json()
    assert (out / REMOTE_CODE_FILE).read_text() == remote_code_source(stock)

    reference = load_pruned_model(out, attn_implementation="eager")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager")
    assert type(remote).__name__ == "PrunedForCausalLM" and not remote.training
    assert list(modules_cache.rglob(REMOTE_CODE_FILE)), "transformers caches the code in HF_MODULES_CACHE"

    # The same modules: zero stand-ins where blocks went, their norms Identity, every tensor equal.
    adapter = adapter_for(remote.config)
    layers = adapter.decoder_layers(remote)
    assert type(layers[0].self_attn).__name__ == "ZeroAttention"
    assert type(layers[3].mlp).__name__ == "ZeroMLP"
    for layer, kind in ((layers[0], "attention"), (layers[3], "mlp"), (layers[2], "attention")):
        assert all(isinstance(layer.get_submodule(n), nn.Identity) for n in adapter.block_norms(kind))
    assert pruned_layout(remote) == pruned_layout(model)
    expected = reference.state_dict()
    got = remote.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)

    _assert_same_logits(remote, reference)
    assert torch.equal(_greedy(remote), _greedy(reference))


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_remote_code_with_sdpa_another_dtype_and_a_device_map(arch: str, tmp_path: Path) -> None:
    out = save_pruned_model(_pruned(arch, "sdpa"), None, tmp_path / "m")
    reference = load_pruned_model(out, dtype=torch.bfloat16, attn_implementation="sdpa")
    remote = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.bfloat16, device_map="cpu", attn_implementation="sdpa"
    )
    assert {p.dtype for p in remote.parameters()} == {torch.bfloat16}
    _assert_same_logits(remote, reference, atol=0)
    assert torch.equal(_greedy(remote), _greedy(reference))


def test_attention_implementation_set_after_loading_reaches_every_layer(tmp_path: Path) -> None:
    """Each layer reads the shared config through a view, so set_attn_implementation reaches it."""
    out = save_pruned_model(_pruned("phi3"), None, tmp_path / "m")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager")
    eager = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager")
    remote.set_attn_implementation("sdpa")
    layers = adapter_for(remote.config).decoder_layers(remote)
    assert layers[1].self_attn.config._attn_implementation == "sdpa"
    _assert_same_logits(remote, eager, atol=1e-5)


def test_auto_config_reads_the_pruned_config(tmp_path: Path) -> None:
    model = _pruned("gemma3")
    out = save_pruned_model(model, None, tmp_path / "m")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "PrunedConfig" and config.model_type == "pruned_gemma3_text"
    assert config.num_attention_heads == model.config.num_attention_heads  # the dense top-level sizes
    assert getattr(config, LAYOUT_KEY) == pruned_layout(model).to_json()
    blocks = getattr(config, BLOCKS_KEY)
    adapter = adapter_for(model.config)
    assert {kind: tuple(blocks[kind]["norms"]) for kind in KINDS} == {
        k: adapter.block_norms(k) for k in KINDS
    }


@pytest.mark.parametrize("trust", [None, False])
def test_without_trust_remote_code_transformers_asks_for_it(trust: bool | None, tmp_path: Path) -> None:
    """Not a shape error after building the dense model with random weights: transformers' own message."""
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True") as err:
            load(out, **kwargs)
        assert "size mismatch" not in str(err.value) and "shape" not in str(err.value)


def test_a_model_loaded_with_the_remote_code_saves_and_loads_again(tmp_path: Path) -> None:
    """transformers' save_pretrained copies the code and keeps auto_map; save_pruned_model rewrites both."""
    out = save_pruned_model(_pruned("gemma2"), None, tmp_path / "m")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager")
    remote.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path / "resaved", trust_remote_code=True, attn_implementation="eager"
    )
    _assert_same_logits(again, remote, atol=0)
    ours = save_pruned_model(remote, None, tmp_path / "ours")
    assert json.loads((ours / "config.json").read_text())[LAYOUT_KEY] == pruned_layout(remote).to_json()
    _assert_same_logits(load_pruned_model(ours, attn_implementation="eager"), remote, atol=0)


# -- where the package is not installed --------------------------------------------------------------

_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib.util, os, sys
    from pathlib import Path
    assert importlib.util.find_spec("pruning") is None, "the pruning package must not be importable here"
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    inputs = load_file("inputs.safetensors")
    out = {}
    for name in sys.argv[1:]:
        load = AutoModelForCausalLM.from_pretrained
        model = load(name, trust_remote_code=True, attn_implementation="eager")
        assert "pruning" not in sys.modules
        with torch.no_grad():
            out[name + ".one"] = model(inputs["ids"][:1]).logits
            out[name + ".three"] = model(inputs["ids"], attention_mask=inputs["mask"]).logits
    cached = list(Path(os.environ["HF_MODULES_CACHE"]).rglob("modeling_pruned.py"))
    assert len(cached) == len(sys.argv) - 1, cached
    save_file({k: v.contiguous() for k, v in out.items()}, "logits.safetensors")
    """
)


def test_loads_where_only_torch_and_transformers_are_installed(tmp_path: Path) -> None:
    """``python -S`` skips site processing, so the editable install's finder is not there: only the
    venv's site-packages on PYTHONPATH, the working directory a fresh one."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    models = {arch: _pruned(arch) for arch in ("gemma3", "phi3")}
    dirs = {arch: save_pruned_model(model, None, work / arch) for arch, model in models.items()}
    ids, mask = _padded_batch()
    save_file({"ids": ids, "mask": mask}, work / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(
        PYTHONPATH=sysconfig.get_paths()["purelib"],
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_OFFLINE="1",
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", _WITHOUT_PACKAGE, *dirs],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logits = load_file(work / "logits.safetensors")
    keep = mask.bool()
    for arch, directory in dirs.items():
        reference = load_pruned_model(directory, attn_implementation="eager")
        with torch.no_grad():
            one = reference(ids[:1]).logits
            three = reference(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[f"{arch}.one"], one, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[f"{arch}.three"][keep], three[keep], atol=1e-5, rtol=0)
    assert list((tmp_path / "hf_modules").rglob(REMOTE_CODE_FILE))


# -- the shipped file ---------------------------------------------------------------------------------


def test_the_shipped_file_imports_only_torch_and_transformers() -> None:
    tree = ast.parse(SOURCE.read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", "typing", "torch", "transformers"}, imported


def test_the_shipped_file_reads_this_packages_layout_version() -> None:
    text = SOURCE.read_text()
    assert f"LAYOUT_VERSION = {LAYOUT_VERSION} " in text
    assert 'BASE_MODEL_TYPE = "qwen3"' in remote_code_source("qwen3")
    assert remote_code_source("qwen3").replace('"qwen3"', '"llama"', 1) == text


def test_a_layout_of_another_version_is_refused_by_the_shipped_code(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config[LAYOUT_KEY]["version"] = LAYOUT_VERSION + 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"reads version {LAYOUT_VERSION}"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_the_shipped_code_reads_only_the_integer_version(version: object) -> None:
    """``true == 1`` and ``1.0 == 1`` in Python: a layout that says either is not a version-1 layout."""
    from types import SimpleNamespace

    from pruning.checkpoint.modeling_pruned import read_layout

    layout = {
        "version": version,
        "num_attention_heads": [4],
        "num_key_value_heads": [2],
        "intermediate_size": [8],
    }
    with pytest.raises(ValueError, match=f"version {version!r}; this modeling code"):
        read_layout(SimpleNamespace(pruning_layout=layout, num_hidden_layers=1))
    layout["version"] = LAYOUT_VERSION
    assert read_layout(SimpleNamespace(pruning_layout=layout, num_hidden_layers=1)) == [(4, 2, 8)]


# -- the package's own readers on the new checkpoints -----------------------------------------------


def test_the_packages_readers_take_the_pruned_model_type(tmp_path: Path) -> None:
    """Family lookup, config-only and header analysis, and weight checks read ``pruned_<type>``."""
    model = _pruned("qwen3")
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert check_supported(config) == "qwen3" and adapter_for(config).name == "qwen3"
    stored = {name: info.shape for name, info in stored_tensors(find_weight_files(out)).items()}
    diff = compare_to_config(config, stored)
    assert not diff.missing and not diff.mismatched and not diff.unexpected
    live = ModelAnalyzer(model, "m").analyze()
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(config))
    for source in (out, config_only):
        report = ModelAnalyzer(str(source), "m").analyze()
        assert report["layers"] == live["layers"] and report["total_params"] == live["total_params"]
        assert report["model_type"] == live["model_type"] == "qwen3"


def test_a_checkpoint_in_the_first_format_still_loads(tmp_path: Path) -> None:
    """Written before the shipped code: model_type ``llama`` plus ``pruning_layout``, no auto_map."""
    model = _pruned("llama_gqa")
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("auto_map", BLOCKS_KEY, "head_dim"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    (out / REMOTE_CODE_FILE).unlink()
    _assert_same_logits(load_pruned_model(out), model)


# -- uniform layers: a stock checkpoint ---------------------------------------------------------------


def _check_stock(model: nn.Module, out: Path) -> None:
    """A stock config with the per-layer sizes and an explicit head_dim; plain from_pretrained loads it."""
    config = json.loads((out / "config.json").read_text())
    sizes = pruned_layout(model)
    assert config["model_type"] == _stock_type(model)
    assert not {LAYOUT_KEY, BLOCKS_KEY, "auto_map"} & set(config)
    assert not (out / REMOTE_CODE_FILE).exists()
    assert config["num_attention_heads"] == sizes.num_attention_heads[0]
    assert config["num_key_value_heads"] == sizes.num_key_value_heads[0]
    assert config["intermediate_size"] == sizes.intermediate_size[0]
    assert config["head_dim"] == 16
    stock = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")  # no trust_remote_code
    assert type(stock) is type(model)
    _assert_same_logits(stock, model)
    _assert_same_logits(load_pruned_model(out, attn_implementation="eager"), model)
    assert torch.equal(_greedy(stock), _greedy(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_layers_give_a_stock_checkpoint(arch: str, tmp_path: Path) -> None:
    groups = 2 if arch == "llama_mha" else 1  # 4 heads -> 2: Llama's config wants heads to divide hidden
    model = uniformly_pruned(arch, groups)
    _check_stock(model, save_pruned_model(model, None, tmp_path / "m"))


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_uniform_head_dim_is_written_where_the_dense_config_derives_it(arch: str, tmp_path: Path) -> None:
    """Qwen2 and Phi-3 configs usually have no head_dim: hidden_size / heads, which pruning changes."""
    model = uniformly_pruned(arch)
    del model.config.head_dim  # the dense model's 64 / 4 heads = 16, now 2 heads per layer
    assert "head_dim" not in model.config.to_dict()
    out = save_pruned_model(model, None, tmp_path / "m")
    _check_stock(model, out)


def test_uniform_head_count_a_stock_config_refuses_keeps_the_pruned_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Llama's config requires hidden_size (64) to be a multiple of the head count (3 here)."""
    model = uniformly_pruned("llama_mha", groups=1)
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint.save"):
        out = save_pruned_model(model, None, tmp_path / "m")
    assert "not a multiple of the number of attention heads" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "pruned_llama"
        and config[LAYOUT_KEY]["num_attention_heads"] == [3] * NUM_LAYERS
    )
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager")
    _assert_same_logits(remote, model)


def test_a_uniform_model_loaded_with_the_shipped_code_is_saved_stock(tmp_path: Path) -> None:
    """transformers' save_pretrained of such a model writes auto_map, the code and its own class name;
    save_pruned_model replaces all three."""
    model = uniformly_pruned("llama_gqa")
    written = tmp_path / "m"
    model.save_pretrained(written)
    config = json.loads((written / "config.json").read_text())
    config.update(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)  # the dense sizes
    pruned = pruned_format(config, pruned_layout(model), adapter_for(model.config), 16)
    (written / "config.json").write_text(json.dumps(pruned))
    write_remote_code(written, "llama")
    remote = AutoModelForCausalLM.from_pretrained(
        written, trust_remote_code=True, attn_implementation="eager"
    )
    _assert_same_logits(remote, model)

    out = save_pruned_model(remote, None, tmp_path / "stock")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    _check_stock(model, out)
