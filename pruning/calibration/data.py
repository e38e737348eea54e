"""Calibration text -> token windows.

Calibration reads a plain text file whole (WikiText-2 raw, say), tokenises it once and cuts windows of
exactly ``seq_len`` tokens at random offsets. Every window is full length, so there is no padding and
no attention mask or loss mask to get wrong. A ``datasets`` name works too when that library is
installed; the tool does not depend on it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pruning.calibration.token_cache import cached_ids
from pruning.errors import UserError
from pruning.storage.fs import MAX_TEXT_BYTES, read_text_file_bounded

logger = logging.getLogger(__name__)

# A source with one of these endings, or one that is written as a path, is a file, never a dataset name.
_TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text", ".tokens")


def looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~"))
        or source.lower().endswith(_TEXT_SUFFIXES)
        or "\\" in source
    )


def is_text_file_path(source: str) -> bool:
    """Whether ``source`` names a file to read: anything there but a directory (a local ``datasets``
    folder), so that a FIFO or a device is refused by name rather than taken for a dataset name."""
    path = Path(source).expanduser()
    return path.exists() and not path.is_dir()


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file, whole; missing, unreadable, not a regular file or not UTF-8: the user's error."""
    return read_text_file_bounded(Path(path).expanduser(), what=what, limit=MAX_TEXT_BYTES)


def _load_dataset_text(name: str, what: str = "calibration") -> str:
    """Join the ``text`` column of a ``datasets`` split; ``name`` is ``path[:config[:split]]``.

    The whole split is joined, so use it for corpora of WikiText's size, not for C4.
    """
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when a name is given
    except ImportError as exc:
        raise UserError(
            f"{what} source {name!r} is not an existing file, and reading it as a dataset name needs "
            "the `datasets` library: pip install datasets, or give a local text file"
        ) from exc
    parts = name.split(":")
    path = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types; all mean "this source is wrong"
        raise UserError(f"cannot load {what} dataset {name!r}: {exc}") from exc
    if "text" not in ds.column_names:
        raise UserError(f"{what} dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(ds["text"])


def source_text(source: str, what: str = "calibration") -> str:
    """The text of a source: ``builtin:NAME`` (``pruning.calibration.texts``), an existing file, else a
    ``datasets`` name (``path[:config[:split]]``)."""
    from pruning.calibration.texts import builtin_text, is_builtin

    if is_builtin(source):
        return builtin_text(source)
    if is_text_file_path(source):
        return read_text_file(source, f"{what} file")
    if looks_like_path(source):
        raise UserError(f"{what} file not found: {source}")
    return _load_dataset_text(source, what)


def text_problem(text: str, tokens_needed: int) -> str | None:
    """Why ``text`` cannot give a window of ``tokens_needed`` tokens, judged without a tokenizer (so
    before any weight is read): empty, binary, or fewer bytes than tokens needed (every token of a
    byte-level or byte-fallback vocabulary covers at least one byte). None if it may."""
    if not text.strip():
        return "is empty"
    sample = text[: 1 << 16]
    controls = sum(1 for c in sample if ord(c) < 32 and c not in "\t\n\r\f\v")
    if "\0" in sample or controls * 100 > len(sample):
        return "is binary, not text (it holds control characters)"
    if len(text) < tokens_needed and len(text.encode("utf-8")) < tokens_needed:
        size = len(text.encode("utf-8"))
        return f"has {size} bytes, fewer than the {tokens_needed} tokens it must give (a token is 1+ bytes)"
    return None


def tokenize(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids of ``text`` without special tokens (no BOS in the middle of the stream), as a 1-D tensor;
    a long text's ids come from the token cache after its first use (``pruning.calibration.token_cache``)."""
    return cached_ids(tokenizer, text)


def calibration_windows(
    source: str, tokenizer: Any, num_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """``num_samples`` contiguous token spans of ``seq_len`` at seeded random offsets: [num_samples, seq_len].

    The same seed gives the same windows on every machine (``torch.Generator``, not global RNG state).
    """
    if num_samples < 1 or seq_len < 1:
        raise UserError(f"calibration needs num_samples >= 1 and seq_len >= 1 (got {num_samples}, {seq_len})")
    ids = tokenize(tokenizer, source_text(source))
    if ids.numel() < seq_len + 1:
        raise UserError(
            f"calibration source {source} has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    windows = torch.stack([ids[o : o + seq_len] for o in offsets.tolist()])
    logger.info(
        "calibration: %d windows of %d tokens from %s (%d tokens)", num_samples, seq_len, source, ids.numel()
    )
    return windows


def window_counts(weights: Sequence[float], num_samples: int) -> list[int]:
    """``num_samples`` split in proportion to ``weights`` (largest remainder, ties to the earlier source).

    The weights are scaled by the largest first, so two weights of 1e308 split evenly instead of
    overflowing their sum to infinity."""
    largest = max(weights)
    scaled = [w / largest for w in weights]
    total = sum(scaled)
    exact = [num_samples * w / total for w in scaled]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def mixed_windows(
    mix: Sequence[tuple[str, float]], tokenizer: Any, num_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """Calibration windows drawn from several texts, each giving a share of ``num_samples`` in proportion
    to its weight (``calibration_windows`` per text, the same seed), source after source.

    A text whose share rounds to no window is the user's error: its weight would silently not count.
    """
    counts = window_counts([weight for _, weight in mix], num_samples)
    for (source, weight), count in zip(mix, counts, strict=True):
        if count == 0:
            raise UserError(
                f"calibration.sources: {source} (weight {weight:g}) gets no window of the {num_samples} "
                "(raise num_samples or its weight)"
            )
    return torch.cat(
        [
            calibration_windows(source, tokenizer, count, seq_len, seed)
            for (source, _), count in zip(mix, counts, strict=True)
        ]
    )
