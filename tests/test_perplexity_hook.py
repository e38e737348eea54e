"""The perplexity hook: dense and pruned perplexity with their protocol, in memory and streamed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pruning
from pruning import reports
from pruning.calibration.perplexity import evaluation_windows, perplexity
from tests.test_pipeline import prune
from tests.tiny_pipeline import REPO, build_tiny_model_dir

WIKI_TEST = str(REPO / "data" / "wikitext-2-raw" / "wiki.test.raw")
HOOK = {
    "name": "perplexity",
    "params": {"text": WIKI_TEST, "protocol": None, "seq_len": 32, "max_tokens": 320},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-ppl") / "model")


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("ppl-runs")
    plain = prune(tmp, tiny_dir, "plain", hooks=["analysis", HOOK])
    streamed = prune(tmp, tiny_dir, "streamed", hooks=[HOOK], model={"streaming": "always"})
    return SimpleNamespace(plain=plain, streamed=streamed)


def test_the_report_holds_dense_and_pruned_perplexity_with_the_protocol(runs, tiny_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert runs.plain.code == 0
    report = reports.load(runs.plain.out / "evaluation" / "perplexity.json")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    windows = evaluation_windows(WIKI_TEST, tokenizer, 32, 320)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    pruned = pruning.load_pruned_model(runs.plain.out / "models")
    assert report["dense"]["perplexity"] == perplexity(dense, windows)
    assert report["pruned"]["perplexity"] == perplexity(pruned, windows)
    assert report["ratio"] == report["pruned"]["perplexity"] / report["dense"]["perplexity"]
    assert report["ratio"] > 1  # a random tiny model still loses something when a fifth is removed
    protocol = report["protocol"]
    assert (protocol["seq_len"], protocol["stride"], protocol["max_tokens"]) == (32, 32, 320)
    assert (protocol["windows"], protocol["tokens_scored"]) == (10, 10 * 31)
    assert protocol["text"] == WIKI_TEST and protocol["dtype"] == "float32" and protocol["name"] is None
    assert "evaluation/perplexity.json" in runs.plain.record["files"]


def test_a_streamed_run_measures_the_same_perplexities(runs):
    assert runs.streamed.code == 0 and runs.streamed.record["placement"]["streamed"]
    plain, streamed = (
        reports.load(r.out / "evaluation" / "perplexity.json") for r in (runs.plain, runs.streamed)
    )
    assert streamed["dense"]["perplexity"] == plain["dense"]["perplexity"]
    assert streamed["pruned"]["perplexity"] == plain["pruned"]["perplexity"]


def test_the_table_is_logged(tmp_path: Path, tiny_dir: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="pruning.hooks.perplexity")
    assert prune(tmp_path, tiny_dir, hooks=[HOOK]).code == 0
    text = caplog.text
    assert "Perplexity (" in text and "10 windows x 32 tokens" in text
    assert "dense" in text and "pruned" in text and "ratio" in text


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"protocol": "wikitext"}, "protocol must be one of"),
        ({"protocol": None}, "seq_len must be an integer >= 2"),
        ({"protocol": None, "seq_len": 64, "max_tokens": 32}, "max_tokens must be an integer >= seq_len"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        (
            {"text": "data/wikitext-2-raw/wiki.tset.raw"},
            "text file not found: data/wikitext-2-raw/wiki.tset.raw",
        ),
    ],
)
def test_bad_params_are_one_line_before_loading(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, params: dict, message: str
):
    result = prune(tmp_path, tiny_dir, hooks=[{"name": "perplexity", "params": params}])
    err = capsys.readouterr().err
    assert result.code == 2 and message in err and "perplexity" in err
    assert len(err.strip().splitlines()) == 1 and not result.out.exists()


def test_named_protocols_are_what_papers_use():
    from pruning.hooks.perplexity import PROTOCOLS, PerplexityHook

    assert PROTOCOLS["paper-2048"] == {"seq_len": 2048, "max_tokens": None}
    hook = PerplexityHook(protocol="quick")
    assert (hook.seq_len, hook.max_tokens) == (512, 8192)


def test_windows_longer_than_the_model_positions_are_a_warning(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Finding 13: paper-2048 on a model with 128 positions measured positions it never saw, silently."""
    from transformers import AutoTokenizer

    from pruning.hooks.perplexity import PerplexityHook

    hook = PerplexityHook(protocol="paper-2048", max_tokens=4096)
    monkeypatch.setattr(hook, "_measure", lambda context: {"perplexity": 1.0, "seconds": 0.0})
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128))
    context = SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
    hook.before_prune(context)
    assert "windows of 2048 tokens are longer than the 128 positions the model has" in caplog.text
    caplog.clear()
    model.config.max_position_embeddings = 2048
    hook.before_prune(context)
    assert "longer than" not in caplog.text
