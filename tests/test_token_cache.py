"""The token cache (``pruning.calibration.token_cache``): the ids a tokenizer gives, kept per (tokenizer,
text), never trusted beyond what it can check."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pruning.calibration import token_cache
from pruning.calibration.token_cache import cache_path, cached_ids

TEXT = "the cache keeps ids\nper tokenizer and text " * 20


def fast_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """Characters as tokens (BPE without merges); ``extra`` adds vocabulary, so a different tokenizer."""
    chars = sorted(set(TEXT + "xyz" + extra) - {" ", "\n"})
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(autouse=True)
def cache_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRUNING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "SMALL_TEXT", 0)
    return tmp_path / "cache"


def _refuse_encoding(tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    def encode(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tokenizer, "encode", encode)


def test_the_second_call_reads_the_ids_the_first_one_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = fast_tokenizer()
    expected = torch.tensor(tokenizer.encode(TEXT, add_special_tokens=False))
    first = cached_ids(tokenizer, TEXT)
    assert cache_path(tokenizer, TEXT).is_file()
    _refuse_encoding(tokenizer, monkeypatch)
    second = cached_ids(tokenizer, TEXT)
    assert first.dtype == second.dtype == torch.long
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_another_text_or_tokenizer_is_another_file() -> None:
    tokenizer, other = fast_tokenizer(), fast_tokenizer(extra="q")
    paths = {cache_path(tokenizer, TEXT), cache_path(tokenizer, TEXT + "x"), cache_path(other, TEXT)}
    assert len(paths) == 3
    assert cache_path(fast_tokenizer(), TEXT) == cache_path(tokenizer, TEXT)  # same definition, same file


def test_short_texts_and_slow_tokenizers_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    class Slow:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [ord(c) for c in text]

    assert cache_path(Slow(), TEXT) is None
    assert cached_ids(Slow(), "ab").tolist() == [97, 98]
    monkeypatch.setattr(token_cache, "SMALL_TEXT", len(TEXT) + 1)
    tokenizer = fast_tokenizer()
    cached_ids(tokenizer, TEXT)
    assert not cache_path(tokenizer, TEXT).exists()


@pytest.mark.parametrize("content", [b"not a safetensors file", None])
def test_a_damaged_or_foreign_file_is_ignored_and_rewritten(
    content: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, or a valid safetensors file holding something else (int64 ids of another shape), is
    not believed: the ids are computed again, the file replaced, and a warning says so."""
    from safetensors.torch import save_file

    tokenizer = fast_tokenizer()
    path = cache_path(tokenizer, TEXT)
    path.parent.mkdir(parents=True)
    if content is None:
        save_file({"ids": torch.zeros(2, 3, dtype=torch.int64)}, path)
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        ids = cached_ids(tokenizer, TEXT)
    assert ids.tolist() == tokenizer.encode(TEXT, add_special_tokens=False)
    assert "tokenising again" in caplog.text and str(path) in caplog.text
    assert torch.equal(token_cache._read(path), ids)


def test_a_cache_folder_that_cannot_be_written_costs_only_time(
    cache_everything: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_everything.mkdir()
    (cache_everything / "tokens").write_text("a file where the folder should be")
    tokenizer = fast_tokenizer()
    with caplog.at_level(logging.WARNING):
        ids = cached_ids(tokenizer, TEXT)
    assert ids.tolist() == tokenizer.encode(TEXT, add_special_tokens=False)
    assert "not written" in caplog.text
    assert (cache_everything / "tokens").read_text() == "a file where the folder should be"


def test_no_temporary_file_is_left_behind(cache_everything: Path) -> None:
    cached_ids(fast_tokenizer(), TEXT)
    assert [p.name for p in (cache_everything / "tokens").iterdir() if p.name.startswith(".")] == []
    assert all(os.access(p, os.R_OK) for p in (cache_everything / "tokens").iterdir())
