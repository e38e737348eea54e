"""ModelComparator: deltas, ratios, zero layers, errors, and the text report in both languages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pruning.analysis import ModelAnalyzer, ModelComparator
from pruning.errors import UserError
from pruning.reports import validate
from tests.conftest import GOLDEN, config_dir, tiny_llama_config


@pytest.fixture
def comparison(hand_pruned) -> dict:
    from transformers import LlamaForCausalLM

    original = ModelAnalyzer(LlamaForCausalLM(tiny_llama_config()), "dense").analyze()
    pruned = ModelAnalyzer(hand_pruned, "hand").analyze()
    return ModelComparator(original, pruned).compare()


def test_totals_and_ratios(comparison: dict):
    total = comparison["total_params"]
    assert total["reduced"] == total["original"] - total["pruned"] > 0
    assert total["reduction_ratio"] == pytest.approx(total["reduced"] / total["original"])
    layers = comparison["layer_params"]
    assert layers["reduced"] == total["reduced"]  # only decoder layers were pruned
    assert (comparison["original_name"], comparison["pruned_name"]) == ("dense", "hand")
    validate(comparison)


def test_per_layer(comparison: dict):
    l0, l1, l2, l3 = comparison["layers"]
    assert l0["attention"]["num_heads"] == {"original": 4, "pruned": 2}
    assert l0["attention"]["num_kv_heads"] == {"original": 2, "pruned": 1}
    assert l0["mlp"]["intermediate_size"] == {"original": 128, "pruned": 100}
    assert l1["attention"]["reduction_ratio"] == 1.0 and l1["mlp"]["reduced"] == 0
    assert l2["is_zero_layer"] and l2["total"]["pruned"] == 0 and l2["total"]["reduction_ratio"] == 1.0
    assert l3["total"]["reduced"] == 0 and l3["total"]["reduction_ratio"] == 0.0
    assert comparison["zero_layers"] == [2]


def test_ratio_is_null_when_original_is_zero(hand_pruned):
    pruned = ModelAnalyzer(hand_pruned, "hand").analyze()
    same = ModelComparator(pruned, pruned).compare()
    assert same["layers"][2]["total"] == {"original": 0, "pruned": 0, "reduced": 0, "reduction_ratio": None}
    validate(same)


def test_different_layer_counts_rejected():
    from transformers import LlamaForCausalLM

    a = ModelAnalyzer(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))).analyze()
    b = ModelAnalyzer(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))).analyze()
    with pytest.raises(UserError, match="different layer counts.*4 layers.*3"):
        ModelComparator(a, b).compare()


def _llama2_pruned_dir(tmp_path: Path) -> Path:
    """Llama-2-7B's config with a pruning layout: layer 0 at 24 heads / 8806 channels, layer 1 gone."""
    config = json.loads((config_dir("llama-2-7b") / "config.json").read_text())
    n = config["num_hidden_layers"]
    heads, inter = [32] * n, [11008] * n
    heads[0], inter[0] = 24, 8806
    heads[1], inter[1] = 0, 0
    config["pruning_layout"] = {
        "version": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": inter,
    }
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(config))
    return tmp_path / "pruned"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_golden_text_report(tmp_path: Path, lang: str):
    original = ModelAnalyzer(config_dir("llama-2-7b"), "Llama-2-7B").analyze()
    pruned = ModelAnalyzer(_llama2_pruned_dir(tmp_path), "Llama-2-7B pruned").analyze()
    comparator = ModelComparator(original, pruned)
    text = comparator.format_report(verbose=True, lang=lang)
    golden = (GOLDEN / f"comparison_{lang}.txt").read_text(encoding="utf-8")
    # The golden files hold the first three layers; the rest repeat layer 2.
    cut = text.index("\n\nLayer  3:")
    tail = text[text.index("\n\n" + ("Fully pruned" if lang == "en" else "完全剪空的层")) :]
    assert text[:cut] + tail == golden.rstrip("\n")


def test_text_report_without_verbose_has_no_layers(comparison: dict):
    text = ModelComparator.__new__(ModelComparator)
    text.result = comparison
    short = text.format_report(verbose=False)
    assert "Layer" not in short and "Fully pruned layers (1): [2]" in short
    assert f"{comparison['total_params']['original']:,}" in short
