"""Token ids of a text, cached on disk per (tokenizer, text).

The built-in code text is Python's library (9.6 MB); tokenising it took 12 to 18 s of every run, for
a few windows. The ids depend only on the tokenizer and the text, so they are kept under the
cache folder (``$PRUNING_CACHE_DIR/tokens``) as safetensors, named by a hash of both: a changed text
or tokenizer is a different file, never a stale one. Only fast tokenizers are cached, since their
whole definition serialises to one string that can be hashed; others tokenise every time.

The cache is an optimisation, never a source of truth: a file that does not read back as a 1-D
integer tensor is ignored with a warning (and rewritten), and a folder that cannot be written only
costs the time it would have saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pruning.source.builtin import cache_dir

logger = logging.getLogger(__name__)

SMALL_TEXT = 1 << 20  # characters: shorter texts tokenise in well under a second, so skip the disk


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything that decides a fast tokenizer's ids (None for others: not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def cache_path(tokenizer: Any, text: str) -> Path | None:
    """Where the ids of ``text`` under ``tokenizer`` are kept (None: this tokenizer is not cached)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    key = hashlib.sha256(f"{fingerprint}\0".encode() + text.encode("utf-8", "surrogatepass")).hexdigest()
    return cache_dir() / "tokens" / f"{key[:32]}.safetensors"


def cached_ids(tokenizer: Any, text: str) -> torch.LongTensor:
    """``tokenizer.encode(text, add_special_tokens=False)`` as a 1-D tensor, from the cache when it
    has it, else computed and stored."""
    path = cache_path(tokenizer, text) if len(text) >= SMALL_TEXT else None
    if path is not None and path.is_file():
        ids = _read(path)
        if ids is not None:
            return ids
    ids = torch.as_tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if path is not None:
        _write(path, ids)
    return ids


def _read(path: Path) -> torch.LongTensor | None:
    try:
        ids = load_file(path).get("ids")
    except (OSError, SafetensorError) as e:
        logger.warning("token cache %s unreadable (%s); tokenising again", path, e)
        return None
    if ids is None or ids.dim() != 1 or ids.dtype != torch.int32:
        logger.warning("token cache %s does not hold one int32 vector; tokenising again", path)
        return None
    return ids.long()


def _write(path: Path, ids: torch.LongTensor) -> None:
    """Written to a private name and renamed, so a reader never sees half a file."""
    if ids.numel() and int(ids.max()) >= 2**31:
        return  # no vocabulary is this large; not worth a wider file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"ids": ids.to(torch.int32).contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("token cache %s not written (%s); the next run tokenises again", path, e)
        with contextlib.suppress(OSError):  # nothing to clean where nothing could be written
            tmp.unlink(missing_ok=True)
