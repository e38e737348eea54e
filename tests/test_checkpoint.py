"""Saving and loading pruned models: same function after the round trip, no pickles, no dense allocation."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pruning.checkpoint import modeling_pruned
from pruning.checkpoint.config_json import pruned_format
from pruning.checkpoint.load import _infer_device_map, _read_state, build_pruned_skeleton, load_pruned_model
from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.checkpoint.save import partial_dir, save_pruned_model
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.storage.weight_files import WeightFiles
from pruning.surgery import apply_plan, pruned_layout
from tests.tiny_models import (
    ARCH_IMPLS,
    ARCHS,
    TIED_ARCHS,
    input_ids,
    make_plan,
    tiny_model,
    uniformly_pruned,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle"}


def _pruned(arch: str, impl: str = "eager") -> nn.Module:
    model = tiny_model(arch, impl)
    apply_plan(model, make_plan(model))
    return model


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "hello": 3, "world": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    specials = dict(unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_shipped_class(model: nn.Module) -> nn.Module:
    """``model`` (a pruned tiny Llama, dense sizes 4 heads, 2 KV heads, 96 channels) as the shipped
    ``PrunedForCausalLM``: what ``from_pretrained(..., trust_remote_code=True)`` of its checkpoint gives."""
    dense = {
        **model.config.to_dict(),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
    }
    pruned = pruned_format(dense, pruned_layout(model), adapter_for(model.config), 16)
    shipped = modeling_pruned.PrunedForCausalLM(modeling_pruned.PrunedConfig.from_dict(pruned))
    shipped.load_state_dict(model.state_dict())
    return shipped.eval()


def _write_weights(model: nn.Module, directory: Path) -> None:
    """The weights as a streamed run writes them before the rest: safetensors, a tied weight once."""
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    state = {name: t.contiguous() for name, t in model.state_dict().items() if name not in tied}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_the_same_model(arch: str, tmp_path: Path) -> None:
    model = _pruned(arch)
    out = save_pruned_model(model, None, tmp_path / "pruned")
    assert out == tmp_path / "pruned"
    text = (out / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"  # as transformers writes it
    assert config["pruning_layout"] == pruned_layout(model).to_json()
    assert config["pruning_layout"]["num_key_value_heads"][0] == 0  # layer 0 attention gone
    assert not [p for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES]
    assert (out / "generation_config.json").is_file()

    loaded = load_pruned_model(out, attn_implementation="eager")
    assert not loaded.training
    ids = input_ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
    assert _numel(loaded) == _numel(model)
    adapter = adapter_for(loaded.config)
    layers = adapter.decoder_layers(loaded)
    assert isinstance(layers[0].self_attn, ZeroAttention)
    assert all(isinstance(layers[0].get_submodule(n), nn.Identity) for n in adapter.block_norms("attention"))
    assert isinstance(layers[2].mlp, ZeroMLP)
    assert all(isinstance(layers[2].get_submodule(n), nn.Identity) for n in adapter.block_norms("mlp"))
    assert pruned_layout(loaded) == pruned_layout(model)
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("arch", TIED_ARCHS)
def test_tied_embeddings_saved_once_and_tied_on_load(arch: str, tmp_path: Path) -> None:
    out = save_pruned_model(_pruned(arch), None, tmp_path / "m")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_pruned_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_untied_lm_head_is_saved(tmp_path: Path) -> None:
    model = _pruned("mistral")
    out = save_pruned_model(model, None, tmp_path / "m")
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    loaded = load_pruned_model(out)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPLS)
def test_loaded_model_generates_like_the_original(arch: str, impl: str, tmp_path: Path) -> None:
    model = _pruned(arch, impl)
    loaded = load_pruned_model(save_pruned_model(model, None, tmp_path / "m"), attn_implementation=impl)
    ids = input_ids()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, use_cache=True, **kwargs)
        assert torch.equal(loaded.generate(ids, use_cache=True, **kwargs), expected)
        assert torch.equal(loaded.generate(ids, use_cache=False, **kwargs), expected)


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _pruned("llama_mha")
    out = save_pruned_model(model, None, tmp_path / "m", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = input_ids()
    torch.testing.assert_close(_logits(load_pruned_model(out), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_tokenizer_is_saved(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), _tokenizer(), tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"] == [3, 4]


def test_dtype_cast_on_load_keeps_rotary_in_fp32(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    loaded = load_pruned_model(out, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.isfinite(_logits(loaded, input_ids())).all()


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        save_pruned_model(_pruned("llama_gqa"), None, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_pruned_model(_pruned("llama_gqa"), None, empty) / "model.safetensors").is_file()


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(_pruned("llama_gqa"), BrokenTokenizer(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_the_clean_up_never_hides_the_error_that_stopped_the_save(tmp_path: Path) -> None:
    """The half-written directory may be gone already (removed by whatever failed); the user still sees
    the first error, not the clean-up's complaint about a missing directory."""

    class VanishingTokenizer:
        def save_pretrained(self, path: str) -> None:
            shutil.rmtree(path)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(_pruned("llama_gqa"), VanishingTokenizer(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_written_beside_the_model_fails_the_save(tmp_path: Path) -> None:
    """Whatever writes into the checkpoint (here the tokenizer), a pickled file is never published."""

    class PicklingTokenizer:
        def save_pretrained(self, path: str) -> None:
            torch.save({"step": 1}, Path(path) / "training_args.bin")

    with pytest.raises(RuntimeError, match=r"pickled files: \['training_args.bin'\]"):
        save_pruned_model(_pruned("llama_gqa"), PicklingTokenizer(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_partial_dir_is_a_new_hidden_sibling_and_missing_parents_are_made(tmp_path: Path) -> None:
    """A streamed run writes its weights there first; the checkpoint's own name stays free until the
    rename, and two runs never share one."""
    out = tmp_path / "runs" / "a" / "models"
    first, second = partial_dir(out), partial_dir(out)
    assert first != second and first.parent == second.parent == out.parent
    assert first.name.startswith(".models.partial-") and second.name.startswith(".models.partial-")
    assert first.is_dir() and second.is_dir() and not any(first.iterdir())
    assert not out.exists()
    nested = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "new" / "dir" / "m")
    assert (nested / "model.safetensors").is_file()


def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask; every file saved gets 0666 less the umask. Only files:
    a directory keeps its mode, and a link is not followed out of the checkpoint."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the checkpoint's")
    outside.chmod(0o600)

    class Tokenizer:
        def save_pretrained(self, path: str) -> None:
            (Path(path) / "tokenizer.json").write_text("{}")
            (Path(path) / "extra").mkdir()  # 0777 less the umask: 0751
            (Path(path) / "extra" / "vocab.txt").write_text("a")
            (Path(path) / "link.txt").symlink_to(outside)

    previous = os.umask(0o026)  # not the usual 0o022; leaves an execute bit, so 0666 is told from 0667
    try:
        out = save_pruned_model(_pruned("llama_gqa"), Tokenizer(), tmp_path / "m")
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    del modes["link.txt"]
    assert modes.pop("extra") == 0o751
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_weights_written_first_get_their_configs(tmp_path: Path) -> None:
    """A streamed run writes the weights into ``partial_dir`` itself; the save adds config.json (the
    class and the parameters' dtype) and the generation config, checks it all and publishes it."""
    model = uniformly_pruned().to(torch.bfloat16)  # a stock config keeps the class save_pretrained would name
    model.generation_config.max_length = 33
    out = tmp_path / "m"
    weights = partial_dir(out)
    _write_weights(model, weights)
    assert save_pruned_model(model, _tokenizer(), out, weights_dir=weights) == out
    assert not weights.exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 33
    loaded = load_pruned_model(out)
    assert all(torch.equal(p, model.get_parameter(name)) for name, p in loaded.named_parameters())
    assert loaded.generation_config.max_length == 33

    model.generation_config = None  # a model without one: nothing to write, and no error
    weights = partial_dir(tmp_path / "n")
    _write_weights(model, weights)
    out = save_pruned_model(model, None, tmp_path / "n", weights_dir=weights)
    assert (out / "config.json").is_file() and not (out / "generation_config.json").exists()


def test_uniform_layers_are_saved_in_the_stock_format(tmp_path: Path) -> None:
    """Every layer with the same sizes: a stock config at those sizes, no layout and no code."""
    model = uniformly_pruned()
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not {"pruning_layout", "pruning_blocks", "auto_map"} & set(config)
    sizes = tuple(config[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size"))
    assert sizes == (2, 1, 64) and config["head_dim"] == 16
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    ids = input_ids()
    torch.testing.assert_close(_logits(load_pruned_model(out), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_a_uniform_model_of_the_shipped_class_is_saved_stock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded with ``trust_remote_code``, a model is a ``PrunedForCausalLM``, and transformers'
    ``save_pretrained`` writes that class name and copies modeling_pruned.py. A stock config names the
    stock class instead, and the code is not left beside it."""
    # What transformers registers when it loads the shipped code; it makes save_pretrained copy the file.
    monkeypatch.setattr(modeling_pruned.PrunedForCausalLM, "_auto_class", "AutoModelForCausalLM")
    model = uniformly_pruned()
    shipped = _as_shipped_class(model)
    shipped.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "modeling_pruned.py").is_file()
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["architectures"] == [
        "PrunedForCausalLM"
    ]

    out = save_pruned_model(shipped, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_pickle_refused_unless_trusted(tmp_path: Path) -> None:
    model = _pruned("llama_gqa")
    path = tmp_path / "model.bin"
    torch.save(model, path)
    with pytest.raises(UserError, match="trust_pickle=True"):
        load_pruned_model(path)
    loaded = load_pruned_model(path, trust_pickle=True)
    assert not loaded.training
    ids = input_ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=0)
    cast = load_pruned_model(path, dtype=torch.bfloat16, trust_pickle=True)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}


def test_a_trusted_pickle_must_hold_a_whole_model(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_pruned("llama_gqa").state_dict(), path)
    with pytest.raises(UserError, match=r"weights.pt holds a OrderedDict, not a whole model"):
        load_pruned_model(path, trust_pickle=True)


def test_directory_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_pruned_model(out)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_loading_is_strict(change: str, tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    state = load_file(out / "model.safetensors")
    if change == "drop":
        del state["model.layers.1.self_attn.q_proj.weight"]
    else:
        state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing" if change == "drop" else "unexpected"):
        load_pruned_model(out)


def test_skeleton_is_built_at_pruned_size_on_meta(tmp_path: Path) -> None:
    model = _pruned("qwen3")
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    skeleton = build_pruned_skeleton(config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not skeleton.model.rotary_emb.inv_freq.is_meta
    assert pruned_layout(skeleton).to_json() == config["pruning_layout"]
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert {name: p.shape for name, p in skeleton.named_parameters()} == shapes
    stock = build_pruned_skeleton({k: v for k, v in config.items() if k != "pruning_layout"})
    assert _numel(stock) == _numel(tiny_model("qwen3")) > _numel(model)
    on_cpu = build_pruned_skeleton(config, device="cpu")
    assert not any(p.is_meta for p in on_cpu.parameters()) and _numel(on_cpu) == _numel(model)


def test_bad_layout_is_a_user_error(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["pruning_layout"]["intermediate_size"] = config["pruning_layout"]["intermediate_size"][:-1]
    with pytest.raises(UserError, match="intermediate_size"):
        build_pruned_skeleton(config)


def test_the_skeleton_refuses_what_it_cannot_build() -> None:
    """A family this package does not prune, a type transformers does not know, and a value the stock
    config class refuses: each one line, with transformers' own reason."""
    config = tiny_model("llama_gqa").config.to_dict()
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        build_pruned_skeleton(
            {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10}
        )
    with pytest.raises(UserError, match="config.json has unknown model_type 'nonsense'"):
        build_pruned_skeleton({**config, "model_type": "nonsense"})
    with pytest.raises(UserError, match=r"config.json is not a valid llama config: .*'rms_norm_eps'"):
        build_pruned_skeleton({**config, "rms_norm_eps": "x"})


def test_the_skeleton_of_the_shipped_config_class_is_the_stock_class() -> None:
    """The config object a model loaded with the shipped code carries (``pruned_llama``) is read as
    Llama with its layout; this package builds it with the stock classes and surgery."""
    model = _pruned("llama_gqa")
    config = _as_shipped_class(model).config
    assert config.model_type == "pruned_llama"
    skeleton = build_pruned_skeleton(config)
    assert type(skeleton).__name__ == "LlamaForCausalLM"
    assert pruned_layout(skeleton) == pruned_layout(model)
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }


def test_what_is_not_a_checkpoint_is_refused_with_the_reason(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(out / "config.json", config_only / "config.json")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "nowhere": "model path .*nowhere does not exist",
        out / "model.safetensors": r"model.safetensors is a file: pass the checkpoint directory",
        tmp_path / "empty": "empty has no config.json",
        config_only: r"config-only holds no weights \(no model.safetensors, index or shards\)",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_pruned_model(path)


def test_reload_prune_again_and_save(tmp_path: Path) -> None:
    """A loaded pruned model carries the old layout in its config; saving writes the new one."""
    loaded = load_pruned_model(save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "a"))
    layout = pruned_layout(loaded).to_json()
    sizes = enumerate(zip(layout["num_key_value_heads"], layout["intermediate_size"], strict=True))
    plan = PruningPlan(
        layers=tuple(LayerPlan(i, kv, ch, remove_channels=(0,) if i == 1 else ()) for i, (kv, ch) in sizes)
    )
    apply_plan(loaded, plan)
    out = save_pruned_model(loaded, None, tmp_path / "b")
    saved_layout = json.loads((out / "config.json").read_text())["pruning_layout"]
    assert saved_layout["intermediate_size"][1] == layout["intermediate_size"][1] - 1
    again = load_pruned_model(out)
    assert pruned_layout(again).to_json() == pruned_layout(loaded).to_json() == saved_layout
    ids = input_ids()
    torch.testing.assert_close(_logits(again, ids), _logits(loaded, ids), atol=1e-5, rtol=0)


# -- trust nothing on load, check everything on save --------------------------------------------------


def test_layout_that_disagrees_with_the_weights(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["pruning_layout"]["intermediate_size"][1] += 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError, match=r"model.layers.1.mlp.\w+_proj.weight is stored as \[\d+, \d+\] but config.json"
    ):
        load_pruned_model(out)


def test_missing_or_truncated_shard(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m", max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    shards[1].write_bytes(shards[1].read_bytes()[:-8])
    with pytest.raises(UserError, match=f"{shards[1].name}: truncated safetensors file"):
        load_pruned_model(out)
    shards[1].unlink()
    with pytest.raises(UserError, match=f"shard {shards[1].name} is missing"):
        load_pruned_model(out)


def test_index_to_pickles_needs_trust(tmp_path: Path) -> None:
    model = _pruned("llama_gqa")
    out = save_pruned_model(model, None, tmp_path / "m")
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, "pytorch_model.bin")})
    )
    with pytest.raises(UserError, match="points at pickled weights"):
        load_pruned_model(out)
    trusted = load_pruned_model(out, trust_pickle=True)
    torch.testing.assert_close(_logits(trusted, input_ids()), _logits(model, input_ids()), atol=1e-5, rtol=0)


def test_a_trusted_shard_of_meta_tensors_is_refused(tmp_path: Path) -> None:
    """A state dict saved from a model on the meta device (built empty, never filled) has every name and
    shape but no values; it is refused, not loaded as a model with weights on meta."""
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].to("meta")
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no stored weights for \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pruned_model(out, trust_pickle=True)


TENSOR_BUGS = {
    "dropped": (lambda state, name: state.pop(name), r"model.layers.1.mlp.up_proj.weight not saved"),
    "reshaped": (
        lambda state, name: state.update({name: state[name].flatten()}),
        r"model.layers.1.mlp.up_proj.weight: F32\[\d+\] on disk",
    ),
    "recast": (
        lambda state, name: state.update({name: state[name].half()}),
        r"model.layers.1.mlp.up_proj.weight: F16\[\d+, 64\] on disk, torch.float32",
    ),
}


@pytest.mark.parametrize(("edit", "message"), list(TENSOR_BUGS.values()), ids=list(TENSOR_BUGS))
def test_a_writer_bug_fails_the_save_and_publishes_nothing(
    edit: Callable[[dict[str, torch.Tensor], str], object], message: str, tmp_path: Path
) -> None:
    """The saved files are read back and compared with the model before the checkpoint is published:
    a tensor dropped, reshaped or stored in another dtype."""
    model = _pruned("llama_gqa")
    original = model.save_pretrained

    def buggy(path, **kwargs):
        original(path, **kwargs)
        state = load_file(Path(path) / "model.safetensors")
        edit(state, "model.layers.1.mlp.up_proj.weight")
        save_file(state, Path(path) / "model.safetensors", metadata={"format": "pt"})

    model.save_pretrained = buggy
    with pytest.raises(RuntimeError, match=message):
        save_pruned_model(model, None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _rewrite_config(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))

    return edit


def _grow_layer_1(config: dict[str, Any]) -> None:
    config["pruning_layout"]["intermediate_size"][1] += 1


CONFIG_BUGS = {
    "layer-sizes": (_rewrite_config(_grow_layer_1), "config.json's layer sizes differ"),
    "head-dim": (_rewrite_config(lambda c: c.update(head_dim=8)), "config.json head_dim 8, the model's 16"),
    "family": (
        _rewrite_config(lambda c: c.update(model_type="pruned_mistral")),
        "config.json model_type 'pruned_mistral'",
    ),
    "no-code": (
        lambda d: (d / "modeling_pruned.py").unlink(),
        "pruning_layout but modeling_pruned.py is missing",
    ),
}


@pytest.mark.parametrize(("edit", "message"), list(CONFIG_BUGS.values()), ids=list(CONFIG_BUGS))
def test_a_config_writer_bug_fails_the_save(
    edit: Callable[[Path], None], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.json is read back too: every layer's sizes, the head width, the family, and the code a
    layout needs."""
    from pruning.checkpoint import save

    original = save._write_config

    def buggy(model: nn.Module, directory: Path) -> None:
        original(model, directory)
        edit(directory)

    monkeypatch.setattr(save, "_write_config", buggy)
    with pytest.raises(RuntimeError, match=message):
        save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# -- device maps -------------------------------------------------------------------------------------


def _cpu_and_disk_map(num_layers: int) -> dict[str, str]:
    """Odd layers offloaded to disk, everything else on the CPU (what a GPU map does, on a CPU)."""
    layers = {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(num_layers)}
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **layers,
        "model.norm": "cpu",
        "lm_head": "cpu",
    }


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma3"])
def test_device_map_with_disk_offload_gives_the_same_model(arch: str, tmp_path: Path) -> None:
    model = _pruned(arch)
    out = save_pruned_model(model, None, tmp_path / "m", max_shard_size="40KB")
    plain = load_pruned_model(out)
    mapped = load_pruned_model(out, device_map=_cpu_and_disk_map(5), offload_folder=tmp_path / "offload")
    assert mapped.hf_device_map["model.layers.1"] == "disk"
    assert any((tmp_path / "offload").iterdir())  # the offloaded layers' weights went to the folder
    ids = input_ids(batch=3)
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, plain(ids).logits)


def test_auto_device_map_within_a_memory_budget(tmp_path: Path) -> None:
    """``auto`` with a CPU budget smaller than the model puts the rest on disk, whole layers at a time."""
    model = _pruned("llama_gqa")
    out = save_pruned_model(model, None, tmp_path / "m")
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) * 3 // 4
    mapped = load_pruned_model(
        out, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off"
    )
    placed = set(mapped.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed
    assert all(not name.startswith("model.layers.1.") for name in mapped.hf_device_map)  # layers stay whole
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, load_pruned_model(out)(ids).logits)


def test_device_map_cpu_keeps_the_stored_dtype_and_accepts_a_stored_tied_copy(tmp_path: Path) -> None:
    """As a plain load does: bf16 weights stay bf16 when config.json names no dtype, and a checkpoint
    that also stores the tied lm_head loads."""
    out = save_pruned_model(_pruned("llama_gqa").to(torch.bfloat16), None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, out / "model.safetensors")
    plain, mapped = load_pruned_model(out), load_pruned_model(out, device_map="cpu")
    assert {p.dtype for p in mapped.parameters()} == {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, plain(ids).logits)


def test_generation_settings_are_read_back(tmp_path: Path) -> None:
    """generation_config.json is the checkpoint's, not one derived from config.json, on either path."""
    model = _pruned("llama_gqa")
    model.generation_config.max_length = 33
    out = save_pruned_model(model, None, tmp_path / "m")
    assert load_pruned_model(out).generation_config.max_length == 33
    assert load_pruned_model(out, device_map="cpu").generation_config.max_length == 33


def test_device_map_refuses_what_it_cannot_place(tmp_path: Path) -> None:
    """A tensor the architecture does not have, a map that leaves nothing to compute, a placement
    accelerate does not offer, and pickled shards: each refused before accelerate reads a weight."""
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    with pytest.raises(UserError, match="every module on disk; nothing would compute"):
        load_pruned_model(out, device_map={"": "disk"}, offload_folder=tmp_path / "off")
    with pytest.raises(UserError, match="'everywhere': expected auto, balanced, balanced_low_0, sequential"):
        load_pruned_model(out, device_map="everywhere")
    state = load_file(out / "model.safetensors")
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing \[\], unexpected \['model.layers.1.mlp.extra.weight'\]"):
        load_pruned_model(out, device_map="cpu")
    del state["model.layers.1.mlp.extra.weight"]
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(UserError, match="device_map needs safetensors weights"):
        load_pruned_model(out, device_map="cpu", trust_pickle=True)


def test_named_device_maps_resolve_as_accelerate_resolves_them() -> None:
    """``sequential`` fills the first GPU; ``auto`` and ``balanced`` spread the layers over both;
    ``balanced_low_0`` keeps GPU 0 free for generation. Resolved on the meta skeleton (GPU ids need no
    GPU here), whole decoder layers at a time."""
    skeleton = build_pruned_skeleton(_pruned("llama_gqa").config)
    budget = {0: 10**7, 1: 10**7, "cpu": 10**7}

    def resolved(how: str) -> dict[str, object]:
        return dict(_infer_device_map(skeleton, how, dict(budget), ["LlamaDecoderLayer"], torch.float32))

    assert resolved("sequential") == {"": 0}
    spread = resolved("auto")
    assert spread == resolved("balanced") and set(spread.values()) == {0, 1}
    assert spread["model.layers.0"] == 0 and spread["model.layers.4"] == 1
    assert resolved("balanced_low_0") == {"": 1}


def test_a_dtype_casts_the_floating_tensors_only(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2, 3), "ids": torch.arange(4)}, file)
    state = _read_state(WeightFiles(tmp_path, safetensors=(file,)), torch.bfloat16, "cpu")
    assert state["w"].dtype == torch.bfloat16 and state["ids"].dtype == torch.int64
    assert torch.equal(state["ids"], torch.arange(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_an_accelerator(tmp_path: Path) -> None:
    """Weights and the rotary buffers (built on the CPU) end up on the device asked for."""
    model = _pruned("llama_gqa")
    out = save_pruned_model(model, None, tmp_path / "m")
    loaded = load_pruned_model(out, device="cuda")
    assert all(t.is_cuda for t in [*loaded.parameters(), *loaded.buffers()])
    ids = input_ids()
    torch.testing.assert_close(_logits(loaded, ids.cuda()).cpu(), _logits(model, ids), atol=1e-4, rtol=0)
    skeleton = build_pruned_skeleton(json.loads((out / "config.json").read_text()), device="cuda")
    assert all(t.is_cuda for t in [*skeleton.parameters(), *skeleton.buffers()])


def test_device_map_checks_the_weights_first(tmp_path: Path) -> None:
    out = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "m")
    state = load_file(out / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(UserError, match="missing.*down_proj"):
        load_pruned_model(out, device_map="cpu")
    good = save_pruned_model(_pruned("llama_gqa"), None, tmp_path / "n")
    with pytest.raises(UserError, match="device_map"):  # disk offload without a folder
        load_pruned_model(good, device_map=_cpu_and_disk_map(5))
    with pytest.raises(UserError, match="no room for any layer"):
        load_pruned_model(good, device_map="auto", max_memory={"cpu": 1000}, offload_folder=tmp_path / "off")
