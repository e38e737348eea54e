"""Built-in texts (``pruning.calibration.texts``): held-out parts never overlap what calibration may
draw from."""

from __future__ import annotations

import pytest

from pruning.calibration.data import mixed_windows, source_text, window_counts
from pruning.calibration.texts import NAMES, builtin_text
from pruning.errors import UserError


def test_every_builtin_text_is_there_and_substantial() -> None:
    for name in NAMES:
        assert len(builtin_text("builtin:" + name)) > 100_000, name


@pytest.mark.parametrize("kind", ["python-code", "python-docs"])
def test_heldout_and_calibration_parts_share_no_document(kind: str) -> None:
    calibration = builtin_text(f"builtin:{kind}").split("\n\n")
    heldout = builtin_text(f"builtin:{kind}-heldout")
    # every long paragraph of the calibration part is absent from the held-out part (documents are
    # whole files or whole help topics, so a shared one would bring its paragraphs along)
    long_paragraphs = [p for p in calibration if len(p) > 400 and calibration.count(p) == 1][:300]
    assert len(long_paragraphs) >= 50
    assert not [p for p in long_paragraphs if p in heldout]


def test_source_text_reads_builtin_names_and_refuses_unknown_ones() -> None:
    assert source_text("builtin:python-docs-heldout") == builtin_text("builtin:python-docs-heldout")
    with pytest.raises(UserError, match="unknown built-in text 'builtin:poetry'"):
        source_text("builtin:poetry")


@pytest.mark.parametrize(
    ("weights", "n", "expected"),
    [([1.0], 7, [7]), ([0.7, 0.15, 0.15], 64, [45, 10, 9]), ([1, 1, 1], 4, [2, 1, 1]), ([3, 1], 8, [6, 2])],
)
def test_window_counts_split_by_weight_and_add_up(weights: list[float], n: int, expected: list[int]) -> None:
    assert window_counts(weights, n) == expected


class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 128 for c in text]


def test_mixed_windows_come_from_each_source_in_its_share(tmp_path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 500)
    b.write_text("b" * 500)
    windows = mixed_windows([(str(a), 3.0), (str(b), 1.0)], _CharTokenizer(), 8, 16, seed=0)
    assert windows.shape == (8, 16)
    assert (windows[:6] == ord("a")).all() and (windows[6:] == ord("b")).all()


def test_a_source_whose_share_rounds_to_nothing_is_refused(tmp_path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("a" * 500)
    with pytest.raises(
        UserError, match=r"calibration.sources: .*a.txt \(weight 0.01\) gets no window of the 4"
    ):
        mixed_windows([(str(a), 1.0), (str(a), 0.01)], _CharTokenizer(), 4, 16, seed=0)
