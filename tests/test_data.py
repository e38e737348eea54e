"""Calibration windows, evaluation windows and perplexity, with a char-level tokenizer and a tiny Llama."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.calibration.data import calibration_windows
from pruning.calibration.perplexity import evaluation_windows, perplexity
from pruning.errors import UserError

WIKI_VALID = Path(__file__).parent.parent / "data" / "wikitext-2-raw" / "wiki.valid.raw"


class CharTokenizer:
    """One token per character (code point mod 128), with a BOS that must never appear in the windows."""

    bos_token_id = 127

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(ch) % 127 for ch in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    words = [f"w{i % 37}x{(i * 7) % 11}" for i in range(400)]
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    return path


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


def test_windows_shape_deterministic_per_seed_and_from_text(text_file: Path) -> None:
    tok = CharTokenizer()
    text = text_file.read_text(encoding="utf-8")
    a = calibration_windows(str(text_file), tok, num_samples=8, seq_len=32, seed=1)
    b = calibration_windows(str(text_file), tok, num_samples=8, seq_len=32, seed=1)
    c = calibration_windows(str(text_file), tok, num_samples=8, seq_len=32, seed=2)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != tok.bos_token_id).all()  # tokenised without special tokens
    for row in a.tolist():
        assert tok.decode(row) in text  # a contiguous span of the text


def test_windows_start_at_many_offsets(text_file: Path) -> None:
    windows = calibration_windows(str(text_file), CharTokenizer(), num_samples=50, seq_len=16, seed=0)
    assert len({tuple(row) for row in windows.tolist()}) > 40


def test_text_of_exactly_seq_len_plus_one_tokens_works(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("abcdefghi", encoding="utf-8")  # 9 tokens
    windows = calibration_windows(str(path), CharTokenizer(), num_samples=3, seq_len=8, seed=0)
    assert windows.shape == (3, 8)
    assert {CharTokenizer().decode(r) for r in windows.tolist()} <= {"abcdefgh", "bcdefghi"}


def test_too_short_text_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("abcdefgh", encoding="utf-8")  # 8 tokens < seq_len + 1
    with pytest.raises(UserError, match="fewer than seq_len"):
        calibration_windows(str(path), CharTokenizer(), num_samples=1, seq_len=8, seed=0)


def test_missing_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt"):
        calibration_windows(str(missing), CharTokenizer(), num_samples=1, seq_len=8, seed=0)


def test_dataset_name_without_datasets_library_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="pip install datasets"):
        calibration_windows("wikitext", CharTokenizer(), num_samples=1, seq_len=8, seed=0)


def test_windows_from_wikitext_file() -> None:
    windows = calibration_windows(str(WIKI_VALID), CharTokenizer(), num_samples=4, seq_len=64, seed=0)
    text = WIKI_VALID.read_text(encoding="utf-8")
    assert windows.shape == (4, 64)
    assert all(CharTokenizer().decode(r) in text for r in windows.tolist())


def test_evaluation_windows_are_consecutive_and_capped(text_file: Path) -> None:
    tok = CharTokenizer()
    ids = tok.encode(text_file.read_text(encoding="utf-8"), add_special_tokens=False)
    windows = evaluation_windows(str(text_file), tok, seq_len=50)
    assert windows.shape == (len(ids) // 50, 50)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    capped = evaluation_windows(str(text_file), tok, seq_len=50, max_tokens=175)
    assert capped.shape == (3, 50)
    with pytest.raises(UserError):
        evaluation_windows(str(text_file), tok, seq_len=10, max_tokens=5)


def test_perplexity_matches_model_loss_and_batching() -> None:
    model = tiny_model()
    windows = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows, use_cache=False).loss
    ppl1 = perplexity(model, windows, batch_size=1)
    ppl3 = perplexity(model, windows, batch_size=3)
    assert ppl1 == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert ppl3 == pytest.approx(ppl1, rel=1e-5)
    assert not model.training


def test_weights_near_the_float_limit_split_evenly() -> None:
    """Finding 7: two weights of 1e308 overflowed their sum to infinity, and every share to NaN."""
    from pruning.calibration.data import window_counts

    assert window_counts([1e308, 1e308], 4) == [2, 2]
    assert window_counts([1.7e308, 0.85e308, 0.85e308], 8) == [4, 2, 2]
    assert window_counts([5e-324, 5e-324], 3) == [2, 1]  # the smallest too: ties go to the earlier
