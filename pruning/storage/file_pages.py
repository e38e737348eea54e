"""Give back the memory of weights that surgery has replaced, when they are pages of a safetensors file.

transformers maps safetensors files into memory (private, copy-on-write). Once scoring has read every
weight, the whole file is resident, and it stays so while any tensor still lives in the mapping (the
embeddings, an untouched layer), even after surgery has replaced most of them with smaller copies: the
peak was the file plus the pruned copies, 1.55x the weights on a 1.1B model (docs/measured.md, "Measured
figures"). ``release`` tells the kernel, with ``madvise(MADV_DONTNEED)``, that it may drop the pages
lying wholly inside one replaced tensor.

That is safe only for pages the process never wrote: the kernel reads them back from the file if
anything touches them again, so a tensor still held elsewhere (a tied or shared weight, a reference a
hook kept) keeps its values. A page written in place (a hook that scaled a weight, fine-tuning before
pruning) has become a private copy, and dropping it would bring back the file's contents; so
``release`` first reads ``/proc/self/pagemap`` and gives back nothing of a tensor with any such page.
Linux only; elsewhere ``release`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from functools import lru_cache
from typing import Any

import numpy

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
SUFFIX = ".safetensors"


@lru_cache(maxsize=1)
def _madvise() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of ``*.safetensors`` files."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(SUFFIX) and fields[1].endswith("p"):
                    low, high = (int(part, 16) for part in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        return []
    return ranges


_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def written_pages(start: int, end: int) -> bool:
    """Whether any page overlapping ``[start, end)`` is no longer the file's: present or swapped but not
    file-backed, i.e. a private copy made by a write. Unknown (pagemap unreadable) counts as written."""
    page = mmap.PAGESIZE
    first, count = start // page, -(-end // page) - start // page
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            entries = pagemap.read(count * 8)
    except OSError:
        return True
    if len(entries) != count * 8:
        return True
    flags = numpy.frombuffer(entries, dtype="<u8")
    private = ((flags & numpy.uint64(_PRESENT | _SWAPPED)) != 0) & ((flags & numpy.uint64(_FILE)) == 0)
    return bool(private.any())


def release(tensor: Any, mappings: list[tuple[int, int]] | None = None) -> int:
    """Let the kernel drop the file pages wholly inside ``tensor``'s bytes; returns the bytes released
    (0 when the tensor is not in a safetensors mapping, or on a system without ``madvise``)."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    ranges = safetensors_mappings() if mappings is None else mappings
    if not any(low <= start and end <= high for low, high in ranges):
        return 0
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first or written_pages(start, end):
        return 0
    if madvise(first, last - first, MADV_DONTNEED) != 0:
        logger.debug("madvise failed (errno %d); the pages stay resident", ctypes.get_errno())
        return 0
    return last - first
