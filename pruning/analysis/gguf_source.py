"""A ``.gguf`` file as the facts analysis counts from: tensor shapes and the hyper-parameters.

Counts come from the tensor shapes, as for every other input. The metadata's head and feed-forward
counts may be one number or, as this package's export writes a non-uniform model (llama.cpp's ``deci``
graph), one per layer; either way each layer's ``attn_q``, ``attn_k``, ``ffn_gate`` and ``ffn_up`` rows
are checked against them for the families whose tensor names are known, so a file whose metadata and
weights disagree (or that lacks a layer's tensors) is refused, never reported as pruned. The header is
read by ``gguf_header``, which bounds every declared length by the bytes in the file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from pruning.analysis.gguf_header import GgufHeader, describe, read_gguf_header
from pruning.errors import UserError
from pruning.families import FAMILIES, GENERIC_FAMILY, FamilyAdapter
from pruning.families.layout import MAX_LAYERS

ARCH_KEY = "general.architecture"
SPLIT_KEY = "split.count"  # a shard of a model split by llama.cpp's gguf-split
BLOCK_COUNT, EMBEDDING = "block_count", "embedding_length"
HEADS, KV_HEADS = "attention.head_count", "attention.head_count_kv"
FEED_FORWARD, KEY_LENGTH = "feed_forward_length", "attention.key_length"
SIZE_KEYS = (BLOCK_COUNT, EMBEDDING, HEADS, KV_HEADS, FEED_FORWARD, KEY_LENGTH)
KEPT = (ARCH_KEY, SPLIT_KEY, *(f".{key}" for key in SIZE_KEYS))  # by suffix: the arch may come later
# llama.cpp's graph for a model with per-layer sizes; its tensors have the Llama names
PER_LAYER_ARCHS = {"deci": "DeciLMForCausalLM"}
_ARCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
# llama.cpp tensor -> the metadata count its rows must agree with (times head_dim for attention), when
# the family maps the tensor; ffn_up only beside a separate ffn_gate (Phi-3 fuses both into ffn_up)
_ROWS = {"attn_q": HEADS, "attn_k": KV_HEADS, "ffn_gate": FEED_FORWARD, "ffn_up": FEED_FORWARD}


@dataclass(frozen=True)
class GgufModel:
    """What ``sources._inventory`` takes: a config-like namespace and the shapes in transformers' names."""

    config: SimpleNamespace
    shapes: dict[str, tuple[int, ...]]
    dtype: str
    tied: bool
    family: FamilyAdapter | None


def gguf_name_to_hf(name: str, family: FamilyAdapter) -> str | None:
    """A llama.cpp tensor name (``blk.3.<name>.weight``) -> the transformers name the family gives it;
    None for non-parameters; a name the family does not know is kept as it is."""
    stem, _, kind = name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match.group(2) in family.gguf_names:
        return f"model.layers.{match.group(1)}.{family.gguf_names[match.group(2)]}.{kind}"
    if stem in family.gguf_top_names:
        return f"{family.gguf_top_names[stem]}.{kind}"
    if stem in family.gguf_buffers:  # computed buffers in transformers, not parameters
        return None
    return name


def read_gguf_model(file: Path) -> GgufModel:
    """Shapes (GGUF stores them innermost-first, so reversed) and hyper-parameters from the header."""
    header = read_gguf_header(file, KEPT)
    meta = _Metadata(header, file)
    arch = meta.architecture()
    family = FAMILIES.for_gguf_arch(arch)
    naming = family or GENERIC_FAMILY
    n_layers = meta.count(f"{arch}.{BLOCK_COUNT}", at_most=MAX_LAYERS)
    hidden = meta.count(f"{arch}.{EMBEDDING}")
    per_layer = {key: meta.per_layer(f"{arch}.{key}", n_layers) for key in (HEADS, KV_HEADS, FEED_FORWARD)}
    if per_layer[KV_HEADS] is None:
        per_layer[KV_HEADS] = per_layer[HEADS]  # llama.cpp's default: no grouped-query attention
    head_dim = meta.head_dim(arch, hidden, per_layer[HEADS])
    shapes: dict[str, tuple[int, ...]] = {}
    types: Counter[str] = Counter()
    for tensor in header.tensors:
        layer = re.match(r"blk\.(\d+)\.", tensor.name)
        if layer and int(layer.group(1)) >= n_layers:
            raise UserError(
                f"{file}: tensor {tensor.name!r} is past the {n_layers} blocks of {arch}.{BLOCK_COUNT}"
            )
        hf_name = gguf_name_to_hf(tensor.name, naming)
        if hf_name is None:
            continue
        shapes[hf_name] = tuple(reversed(tensor.ne))
        if len(tensor.ne) > 1:
            types[tensor.type_name] += 1
    if family is not None or arch in PER_LAYER_ARCHS:
        _check_rows(file, arch, naming, header, per_layer, head_dim, n_layers)
    heads = per_layer[HEADS] or [0]
    config = SimpleNamespace(
        model_type=family.model_types[0] if family else arch,
        hidden_size=hidden,
        num_attention_heads=heads[0] or max(heads),
        num_hidden_layers=n_layers,
        head_dim=head_dim,
        architectures=[PER_LAYER_ARCHS[arch]] if arch in PER_LAYER_ARCHS else None,
    )
    dtype = f"gguf:{types.most_common(1)[0][0]}" if types else "gguf"
    return GgufModel(config, shapes, dtype, naming.lm_head not in shapes, family)


class _Metadata:
    """Typed access to the kept keys; a missing or ill-typed value is a UserError naming key and file."""

    def __init__(self, header: GgufHeader, file: Path) -> None:
        self.values, self.file = header.values, file

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.file}: GGUF metadata {what}")

    def architecture(self) -> str:
        split = self.values.get(SPLIT_KEY)
        if isinstance(split, int) and split > 1:
            raise self.fail(
                f"says this is one of {split} shards ({SPLIT_KEY}); merge them with llama-gguf-split --merge"
            )
        arch = self.values.get(ARCH_KEY)
        if arch is None:
            raise self.fail(f"has no {ARCH_KEY}")
        if not isinstance(arch, str) or not _ARCH_RE.fullmatch(arch):
            raise self.fail(f"{ARCH_KEY} is {describe(arch)}, not an architecture name")
        return arch

    def count(self, key: str, *, at_most: int | None = None) -> int:
        """A positive integer the model cannot be counted without."""
        value = self.values.get(key)
        if value is None:
            raise self.fail(f"has no {key}")
        if not _is_int(value) or value <= 0:
            raise self.fail(f"{key} is {describe(value)}, not a positive integer")
        if at_most is not None and value > at_most:
            raise self.fail(f"{key} is {value:,}; at most {at_most:,}")
        return value

    def per_layer(self, key: str, n_layers: int) -> list[int] | None:
        """One count for every layer: a single number holds for all, an array must have one per layer."""
        value = self.values.get(key)
        if value is None:
            return None
        if _is_int(value) and value >= 0:
            return [value] * n_layers
        if isinstance(value, tuple) and len(value) == n_layers and all(v >= 0 for v in value):
            return list(value)
        if isinstance(value, tuple) and len(value) != n_layers:
            raise self.fail(f"{key} has {len(value):,} entries, but there are {n_layers} blocks")
        raise self.fail(f"{key} is {describe(value)}, not a count or one count per block")

    def head_dim(self, arch: str, hidden: int, heads: list[int] | None) -> int:
        """``key_length``, else hidden / layer 0's head count, as llama.cpp derives it (the first
        non-zero count if layer 0 has none)."""
        if f"{arch}.{KEY_LENGTH}" in self.values:
            return self.count(f"{arch}.{KEY_LENGTH}")
        first = (heads or [0])[0] or next((h for h in heads or [] if h), 0)
        if not 0 < first <= hidden:
            raise self.fail(
                f"has no {arch}.{KEY_LENGTH}, and the head width cannot be derived from {arch}.{HEADS} "
                f"({first:,}) and {arch}.{EMBEDDING} ({hidden:,})"
            )
        return hidden // first


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rows(
    file: Path,
    arch: str,
    naming: FamilyAdapter,
    header: GgufHeader,
    per_layer: dict[str, list[int] | None],
    head_dim: int,
    n_layers: int,
) -> None:
    """Each layer's projection rows agree with the metadata's counts for that layer (absent = 0 rows)."""
    rows = {t.name: (t.ne[-1] if len(t.ne) == 2 else None) for t in header.tensors}
    for short, key in _ROWS.items():
        counts = per_layer[key]
        fused = short == "ffn_up" and "ffn_gate" not in naming.gguf_names
        if counts is None or short not in naming.gguf_names or fused:
            continue
        width = head_dim if key != FEED_FORWARD else 1
        for idx in range(n_layers):
            name = f"blk.{idx}.{short}.weight"
            found, expected = rows.get(name, 0), counts[idx] * width
            if found == expected:
                continue
            told = f"{arch}.{key}[{idx}] is {counts[idx]}" + (f" ({head_dim} rows each)" if width > 1 else "")
            stored = f"has {found} rows" if found is not None else "is not 2-D"
            if name not in rows:
                stored = "is missing"
            raise UserError(f"{file}: {name} {stored}, but {told}; metadata and weights disagree")
