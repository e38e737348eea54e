"""The shape of a tokenizer.json, checked in full before the GGUF export uses any of it.

The GGUF's token list, token types, merges and special ids all come from tokenizer.json, and llama.cpp
cannot notice a wrong one: an id past the model's vocabulary reads another tensor row or none, and two
tokens sharing an id lose one. A wrong shape (``"model": 5``, a vocabulary given as an array, an id of
-5) used to escape as a traceback from the tokenizers library or from gguf's ``SpecialVocab``. So every
part that the export or ``SpecialVocab`` reads is checked here, before anything is written, and what is
wrong is one ``UserError`` naming the file and the JSON path, e.g.
``tokenizer.json: model.vocab["foo"]: id 99999999999 is outside the vocabulary (0..49151)``.
What neither reads (the decoder, a normalizer's details) is left to the tokenizers library, whose
refusal (``parse_tokenizer``) becomes the same kind of line.

Holes in the ids are allowed: the export writes an unused placeholder there, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pruning.errors import UserError

BYTE_LEVEL, BYTE_FALLBACK = "gpt2", "llama"  # llama.cpp's tokenizer.ggml.model for each kind of BPE
_MISSING = object()
_ROW_COLUMN = re.compile(r" at line \d+ column \d+$")  # serde's position, in our re-serialised text


def describe(value: Any) -> str:
    """A JSON value's type and (short, one-line) text, for a message."""
    if value is _MISSING:
        return "nothing"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"))
    kind = next((name for types, name in kinds if isinstance(value, types)), "an object")
    return "null" if value is None else f"{kind} {show(value)}"


def show(value: Any, limit: int = 60) -> str:
    """``value`` as JSON on one line, at most ``limit`` characters (a token may be anything)."""
    return one_line(json.dumps(value, ensure_ascii=False, default=str), limit)


def one_line(text: str, limit: int) -> str:
    """``text`` without a line break of any kind (``str.splitlines`` splits on more than newline) or
    other unprintable character, cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Check:
    """Refusals that name the file and the JSON path."""

    def __init__(self, source: str, vocab_size: int) -> None:
        self.source, self.vocab_size = source, vocab_size

    def fail(self, path: str, problem: str) -> None:
        raise UserError(f"{self.source}: {path}: {problem}")

    def expect(self, value: Any, types: type | tuple[type, ...], path: str, what: str) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            self.fail(path, f"expected {what}, got {describe(value)}")

    def token_id(self, value: Any, path: str) -> int:
        self.expect(value, int, path, "an integer token id")
        if not 0 <= value < self.vocab_size:
            self.fail(path, f"id {show(value)} is outside the vocabulary (0..{self.vocab_size - 1})")
        return int(value)


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_tokenizer_json(data: Mapping[str, Any], vocab_size: int, source: str) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (BPE with byte fallback) for a tokenizer.json whose every
    part that the export reads is well formed and whose ids fit ``vocab_size``; else a UserError."""
    check = _Check(source, vocab_size)
    model = data.get("model", _MISSING)
    check.expect(model, dict, "model", "an object")
    kind = _model_kind(check, model)
    vocab = model.get("vocab", _MISSING)
    check.expect(vocab, dict, "model.vocab", "an object mapping each token to its id")
    by_id: dict[int, str] = {}
    for token, token_id in vocab.items():
        if type(token_id) is not int or not 0 <= token_id < vocab_size or token_id in by_id:
            path = f"model.vocab[{show(token)}]"  # made only to say what is wrong: 49k tokens is common
            check.token_id(token_id, path)
            check.fail(path, f"id {token_id} is also the id of {show(by_id[token_id])}")
        by_id[token_id] = token
    _check_merges(check, model.get("merges", _MISSING), vocab)
    _check_added_tokens(check, data.get("added_tokens", []), vocab, by_id)
    for name, children in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        _check_steps(check, data.get(name), name, children)
    _check_post_processor(check, data.get("post_processor"))
    return kind


def _model_kind(check: _Check, model: Mapping[str, Any]) -> str:
    kind = model.get("type", _MISSING)
    check.expect(kind, str, "model.type", "a string naming the model (BPE)")
    if kind != "BPE":
        check.fail(
            "model.type",
            f"a {show(kind)} tokenizer; the GGUF export writes BPE tokenizers (byte-level or with byte "
            "fallback)",
        )
    check.expect(model.get("byte_fallback", False), (bool, type(None)), "model.byte_fallback", "a boolean")
    for affix in ("continuing_subword_prefix", "end_of_word_suffix"):
        value = model.get(affix)
        check.expect(value, (str, type(None)), f"model.{affix}", "a string or null")
        if value:  # llama.cpp's BPE merges plain pieces: the GGUF would tokenize differently
            check.fail(f"model.{affix}", f"{show(value)}: llama.cpp's BPE has no subword affixes")
    return BYTE_FALLBACK if model.get("byte_fallback") else BYTE_LEVEL


def _check_merges(check: _Check, merges: Any, vocab: Mapping[str, int]) -> None:
    """One form throughout ("a b" strings, or [a, b] pairs; SpecialVocab takes the first merge's form
    for all), and every piece and every merged result a token, as the tokenizers library requires."""
    check.expect(merges, list, "model.merges", "an array of merges")
    strings = bool(merges) and isinstance(merges[0], str)
    for i, merge in enumerate(merges):
        if strings:
            parts = merge.split(" ") if type(merge) is str else ()
            if len(parts) != 2:
                expected = '"left right" (as model.merges[0])'
                check.fail(f"model.merges[{i}]", f"expected {expected}, got {describe(merge)}")
        else:
            parts = merge if type(merge) is list else ()
            if len(parts) != 2 or type(parts[0]) is not str or type(parts[1]) is not str:
                expected = 'a pair of strings ["left", "right"]'
                check.fail(f"model.merges[{i}]", f"expected {expected}, got {describe(merge)}")
        left, right = parts
        for which, token in (("", left), ("", right), ("the merged token ", left + right)):
            if token not in vocab:
                check.fail(f"model.merges[{i}]", f"{which}{show(token)} is not in model.vocab")


def _check_added_tokens(
    check: _Check, added: Any, vocab: Mapping[str, int], by_id: Mapping[int, str]
) -> None:
    """Each an object with an id in the vocabulary and non-empty text; one id per text and one text per
    id, across the added tokens and model.vocab (a token may be in both, with the same id)."""
    check.expect(added, list, "added_tokens", "an array of token objects")
    ids: dict[int, int] = {}
    texts: dict[str, int] = {}
    for i, entry in enumerate(added):
        path = f"added_tokens[{i}]"
        check.expect(entry, dict, path, "an object (id, content, special)")
        token_id = check.token_id(entry.get("id", _MISSING), f"{path}.id")
        content = entry.get("content", _MISSING)
        check.expect(content, str, f"{path}.content", "the token's text, a string")
        check.expect(entry.get("special", False), bool, f"{path}.special", "a boolean")
        if not content:
            check.fail(f"{path}.content", "empty; a token needs text")
        if by_id.get(token_id, content) != content:
            check.fail(path, f"id {token_id} is {show(by_id[token_id])} in model.vocab, not {show(content)}")
        if vocab.get(content, token_id) != token_id:
            check.fail(path, f"{show(content)} is id {vocab[content]} in model.vocab, not {token_id}")
        if token_id in ids:
            check.fail(path, f"id {token_id} is also the id of added_tokens[{ids[token_id]}]")
        if content in texts:
            check.fail(path, f"{show(content)} is also added_tokens[{texts[content]}]")
        ids[token_id], texts[content] = i, i


def _check_steps(check: _Check, value: Any, path: str, children: str) -> None:
    """A normalizer or pre-tokenizer as the export walks it (a ``Sequence``'s steps, each step's
    ``type``, ``prepend`` and ``prepend_scheme``), without recursion: JSON may nest deeper than Python."""
    if value is None:
        return
    pending = [(value, path)]
    while pending:
        step, where = pending.pop()
        check.expect(step, dict, where, "an object")
        for key in ("type", "prepend", "prepend_scheme"):
            if key in step:
                check.expect(step[key], str, f"{where}.{key}", "a string")
        if children in step:
            check.expect(step[children], list, f"{where}.{children}", "an array")
            pending.extend((child, f"{where}.{children}[{i}]") for i, child in enumerate(step[children]))


def _check_post_processor(check: _Check, value: Any) -> None:
    """What gguf's SpecialVocab reads to decide whether BOS/EOS are added: a ``Sequence``'s processors,
    a template's ``SpecialToken`` ids, RoBERTa's ``cls``/``sep`` pairs."""
    if value is None:
        return
    pending = [(value, "post_processor")]
    while pending:
        step, where = pending.pop()
        check.expect(step, dict, where, "an object")
        if "processors" in step:
            check.expect(step["processors"], list, f"{where}.processors", "an array")
            pending.extend((child, f"{where}.processors[{i}]") for i, child in enumerate(step["processors"]))
        for key in ("single", "pair"):
            pieces = step.get(key, [])
            check.expect(pieces, list, f"{where}.{key}", "an array")
            for i, piece in enumerate(pieces):
                check.expect(piece, dict, f"{where}.{key}[{i}]", "an object")
                special = piece.get("SpecialToken", {})
                check.expect(special, dict, f"{where}.{key}[{i}].SpecialToken", "an object")
                check.expect(special.get("id", ""), str, f"{where}.{key}[{i}].SpecialToken.id", "a string")
        for key in ("cls", "sep"):
            pair = step.get(key, ["", 0])
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                check.fail(f"{where}.{key}", f'expected ["token", id], got {describe(pair)}')


def parse_tokenizer(data: Mapping[str, Any], source: str) -> Any:
    """The tokenizers library's ``Tokenizer`` for exactly the checked ``data`` (re-serialised, so the
    file is not read twice); what the library still refuses is a UserError naming ``source``."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the library's one exception type for content it cannot build
        reason = _ROW_COLUMN.sub("", str(e) or type(e).__name__)
        raise UserError(f"{source}: the tokenizers library cannot build it: {one_line(reason, 200)}") from e
