"""ModelAnalyzer on real model configs, a hand-pruned model, and every input kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pruning.analysis import ModelAnalyzer
from pruning.analysis.analyzer import analyze_inventory
from pruning.errors import UserError
from pruning.reports import validate
from tests.conftest import build_hand_pruned, config_dir, tiny_llama_config
from tests.tiny_models import ARCHS


def assert_invariant(report: dict) -> None:
    """total = embedding + untied lm_head + final norm + layers + other, and layers add up."""
    lm_head = 0 if report["tied_embeddings"] else report["lm_head_params"]
    layers = sum(layer["total"] for layer in report["layers"])
    assert report["layer_summary"]["total_layer_params"] == layers
    assert report["total_params"] == (
        report["embedding_params"] + lm_head + report["final_norm_params"] + layers + report["other_params"]
    )
    for layer in report["layers"]:
        attn, mlp = layer["attention"], layer["mlp"]
        assert layer["total"] == attn["total"] + mlp["total"] + layer["norm"] + layer["other"]
        assert layer["is_zero_layer"] == (layer["total"] == 0)
    validate(report)


def test_llama2_7b_from_config_alone():
    report = ModelAnalyzer(config_dir("llama-2-7b")).analyze()
    assert report["total_params"] == 6_738_415_616
    assert report["embedding_params"] == report["lm_head_params"] == 131_072_000
    assert not report["tied_embeddings"]
    assert report["final_norm_params"] == 4_096
    assert report["layer_summary"] == {"num_layers": 32, "total_layer_params": 32 * 202_383_360}
    for layer in report["layers"]:
        assert layer["total"] == 202_383_360
        assert layer["attention"]["total"] == 67_108_864
        assert layer["attention"]["q_proj"] == 16_777_216
        assert (layer["attention"]["num_heads"], layer["attention"]["num_kv_heads"]) == (32, 32)
        assert layer["mlp"]["total"] == 135_266_304
        assert layer["mlp"]["intermediate_size"] == 11_008
        assert layer["norm"] == 8_192
        assert layer["attention"]["type"] == "LlamaAttention" and layer["mlp"]["type"] == "LlamaMLP"
    assert report["dtype"] == "float16" and report["source"] == "config"
    assert_invariant(report)


def test_llama3_8b_gqa():
    report = ModelAnalyzer(config_dir("llama-3-8b")).analyze()
    assert report["total_params"] == 8_030_261_248
    layer = report["layers"][0]
    assert (layer["attention"]["num_heads"], layer["attention"]["num_kv_heads"]) == (32, 8)
    assert layer["attention"]["k_proj"] == 4096 * 1024
    assert layer["mlp"]["intermediate_size"] == 14_336
    assert_invariant(report)


def test_qwen25_7b_biases_count_in_projections():
    report = ModelAnalyzer(config_dir("qwen2.5-7b")).analyze()
    assert report["total_params"] == 7_615_616_512
    attn = report["layers"][0]["attention"]
    assert attn["q_proj"] == 3584 * 3584 + 3584
    assert attn["k_proj"] == attn["v_proj"] == 3584 * 512 + 512
    assert attn["o_proj"] == 3584 * 3584
    assert (attn["num_heads"], attn["num_kv_heads"], attn["type"]) == (28, 4, "Qwen2Attention")
    assert_invariant(report)


def test_tied_embeddings_counted_once_live_and_from_disk(tmp_path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    live = ModelAnalyzer(model, "tiny").analyze()
    assert live["tied_embeddings"] is True
    assert live["lm_head_params"] == live["embedding_params"] == 128 * 64
    assert live["total_params"] == sum(p.numel() for p in model.parameters())
    assert_invariant(live)
    model.save_pretrained(tmp_path / "m")
    from_disk = ModelAnalyzer(tmp_path / "m", "tiny").analyze()
    assert from_disk["source"] == "safetensors"
    assert {**from_disk, "source": "live"} == live


def test_untied_live_model_matches_numel():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    report = ModelAnalyzer(model).analyze()
    assert not report["tied_embeddings"]
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["layers"][0]["attention"]["q_proj"] == 64 * 64 + 64
    assert_invariant(report)


def test_hand_pruned_live(hand_pruned):
    report = ModelAnalyzer(hand_pruned, "hand").analyze()
    assert report["total_params"] == sum(p.numel() for p in hand_pruned.parameters())
    l0, l1, l2, l3 = report["layers"]
    assert (l0["attention"]["num_heads"], l0["attention"]["num_kv_heads"]) == (2, 1)
    assert l0["attention"]["total"] == 64 * 32 * 2 + 64 * 16 * 2
    assert l0["mlp"]["intermediate_size"] == 100 and l0["mlp"]["total"] == 3 * 64 * 100
    assert l1["attention"] == {
        "type": "ZeroAttention",
        "total": 0,
        "q_proj": 0,
        "k_proj": 0,
        "v_proj": 0,
        "o_proj": 0,
        "num_heads": 0,
        "num_kv_heads": 0,
    }
    assert l1["norm"] == 64 and not l1["is_zero_layer"]
    assert l2["is_zero_layer"] and l2["total"] == 0 and l2["mlp"]["type"] == "ZeroMLP"
    assert (l3["attention"]["num_heads"], l3["attention"]["num_kv_heads"]) == (4, 2)
    assert l3["mlp"]["intermediate_size"] == 128
    assert_invariant(report)


def test_hand_pruned_from_safetensors_equals_live(hand_pruned, hand_pruned_dir):
    live = ModelAnalyzer(hand_pruned, "hand").analyze()
    from_headers = ModelAnalyzer(hand_pruned_dir, "hand").analyze()
    assert from_headers["source"] == "safetensors"
    assert {**from_headers, "source": "live"} == live


def test_hand_pruned_from_config_layout_equals_live(hand_pruned, hand_pruned_dir, config_only_copy):
    live = ModelAnalyzer(hand_pruned, "hand").analyze()
    from_config = ModelAnalyzer(config_only_copy(hand_pruned_dir), "hand").analyze()
    assert from_config["source"] == "config"
    assert {**from_config, "source": "live"} == live


def test_pickle_refused_unless_trusted(tmp_path: Path):
    model = build_hand_pruned()
    path = tmp_path / "pruned_model.bin"
    torch.save(model, path)
    with pytest.raises(UserError, match="refusing to unpickle.*--trust-pickle"):
        ModelAnalyzer(path).analyze()
    report = ModelAnalyzer(path, trust_pickle=True).analyze()
    assert report["source"] == "pickle"
    assert report["total_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"model_type": "no-such-arch", "hidden_size": 8}), "unsupported architecture"),
        (json.dumps({"model_type": "llama", "hidden_size": 64}), "num_attention_heads"),
    ],
)
def test_bad_config_is_a_user_error(tmp_path: Path, content: str, message: str):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(UserError, match=message):
        ModelAnalyzer(tmp_path).analyze()


def test_truncated_safetensors_is_a_user_error(hand_pruned_dir: Path):
    file = hand_pruned_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        ModelAnalyzer(hand_pruned_dir).analyze()
    file.write_bytes(data[:20])
    with pytest.raises(UserError, match="model.safetensors: truncated or corrupt"):
        ModelAnalyzer(hand_pruned_dir).analyze()


def test_missing_path_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="no such file"):
        ModelAnalyzer(tmp_path / "nope").analyze()


def test_generic_architecture_falls_back_to_meta_build(tmp_path: Path):
    """A family without shape rules is built on the meta device; counts still equal the live model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=100,
    )
    config.save_pretrained(tmp_path)
    report = ModelAnalyzer(tmp_path).analyze()
    assert report["total_params"] == sum(p.numel() for p in Gemma2ForCausalLM(config).parameters())
    assert report["layers"][0]["attention"]["type"] == "Gemma2Attention"
    assert report["layers"][0]["norm"] == 4 * 64  # Gemma2 has four norms per layer
    assert_invariant(report)


@pytest.mark.parametrize(
    ("arch", "gguf_arch"),
    [
        ("llama_gqa", "LLAMA"),
        ("qwen2", "QWEN2"),
        ("phi3", "PHI3"),
        ("gemma2", "GEMMA2"),
        ("gemma3", "GEMMA3"),
        ("qwen3", "QWEN3"),
    ],
)
def test_gguf_of_every_family_equals_live(arch: str, gguf_arch: str, tmp_path: Path):
    """A GGUF written with the gguf package, tensor names as llama.cpp's converter writes them (gguf's own
    name map, fused ones included), shapes reversed, is analysed from its metadata like the live model."""
    import gguf

    from tests.tiny_models import tiny_model

    model = tiny_model(arch)
    arch_id = getattr(gguf.MODEL_ARCH, gguf_arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch_id])
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_embedding_length(model.config.hidden_size)
    writer.add_head_count(model.config.num_attention_heads)
    writer.add_head_count_kv(model.config.num_key_value_heads)
    writer.add_key_length(16)
    for name, param in model.named_parameters():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), param.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    live = ModelAnalyzer(model, "tiny").analyze()
    from_gguf = ModelAnalyzer(path, "tiny").analyze()
    assert from_gguf["source"] == "gguf" and from_gguf["dtype"] == "gguf:F32"
    assert {**from_gguf, "source": "live", "dtype": "float32"} == live


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_of_every_family_counts_the_same_from_every_source(
    arch: str, tmp_path: Path, config_only_copy
):
    """Live, from the saved safetensors headers, and from config.json's layout alone."""
    from pruning.checkpoint.save import save_pruned_model
    from pruning.surgery import apply_plan
    from tests.tiny_models import make_plan, tiny_model

    model = tiny_model(arch)
    apply_plan(model, make_plan(model))
    out = save_pruned_model(model, None, tmp_path / arch)
    live = ModelAnalyzer(model, "m").analyze()
    assert live["total_params"] == sum(p.numel() for p in model.parameters())
    assert live["layers"][2]["is_zero_layer"] and live["layers"][0]["attention"]["type"] == "ZeroAttention"
    from_disk = ModelAnalyzer(out, "m").analyze()
    from_config = ModelAnalyzer(config_only_copy(out), "m").analyze()
    assert {**from_disk, "source": "live"} == live
    assert {**from_config, "source": "live"} == live


@pytest.mark.parametrize(
    ("name", "total", "attention_type"),
    [
        # published parameter counts of the real checkpoints
        ("phi-3-mini-4k", 3_821_079_552, "Phi3Attention"),
        ("gemma-2-2b", 2_614_341_888, "Gemma2Attention"),
        ("gemma-3-1b", 999_885_952, "Gemma3Attention"),
    ],
)
def test_new_families_from_config_alone_match_published_counts(name: str, total: int, attention_type: str):
    report = ModelAnalyzer(config_dir(name)).analyze()
    assert report["total_params"] == total
    assert report["layers"][0]["attention"]["type"] == attention_type
    assert_invariant(report)
    from pruning.analysis.sources import _inventory_from_meta_build

    meta = analyze_inventory(_inventory_from_meta_build(config_dir(name)), "m")
    assert meta["total_params"] == total  # transformers' own build agrees
