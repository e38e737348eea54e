"""Saving and loading pruned models: same function after the round trip, no pickles, no dense allocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pruning.checkpoint.load import build_pruned_skeleton, load_pruned_model
from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.checkpoint.save import save_pruned_model
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_plan, pruned_layout
from tests.tiny_models import ARCH_IMPLS, ARCHS, TIED_ARCHS, input_ids, make_plan, tiny_model

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


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_the_same_model(arch: str, tmp_path: Path) -> None:
    model = _pruned(arch)
    out = save_pruned_model(model, None, tmp_path / "pruned")
    assert out == tmp_path / "pruned"
    config = json.loads((out / "config.json").read_text())
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


def test_a_writer_bug_fails_the_save_and_publishes_nothing(tmp_path: Path) -> None:
    """The saved files are read back and compared with the model before the checkpoint is published."""
    model = _pruned("llama_gqa")
    original = model.save_pretrained

    def drops_a_tensor(path, **kwargs):
        original(path, **kwargs)
        state = load_file(Path(path) / "model.safetensors")
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, Path(path) / "model.safetensors", metadata={"format": "pt"})

    model.save_pretrained = drops_a_tensor
    with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.up_proj.weight not saved"):
        save_pruned_model(model, None, tmp_path / "m")
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
