"""The tokenizer of a checkpoint as GGUF metadata, so llama.cpp tokenizes as transformers does.

Two kinds are written: byte-level BPE (``tokenizer.ggml.model`` ``gpt2``: SmolLM, Llama 3, Qwen2) and
SentencePiece-style BPE with byte fallback (``llama``: Llama 2, Mistral). BPE needs one more fact that
tokenizer.json does not state in a form llama.cpp reads: which pre-tokenizer regex to use
(``tokenizer.ggml.pre``). llama.cpp's own converter identifies it by hashing the token ids of a fixed
probe text; we do the same with the same probe and the hashes of the families we claim (below), and
fall back to llama.cpp's ``default`` with a warning for any other tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from pruning.errors import UserError
from pruning.export.tokenizer_files import check_tokenizer_side_files
from pruning.export.tokenizer_json import BYTE_LEVEL, check_tokenizer_json, parse_tokenizer
from pruning.storage.json_files import read_json_object

logger = logging.getLogger(__name__)

# llama.cpp's probe text (conversion/base.py, get_vocab_base_pre) and the pre-tokenizers its hashes name.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
    "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer(probe_ids: list[int]) -> str:
    """llama.cpp's name for the pre-tokenizer that splits ``PROBE_TEXT`` into ``probe_ids``, found as
    its converter finds it (by a hash of the ids)."""
    digest = hashlib.sha256(str(probe_ids).encode()).hexdigest()
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        logger.warning(
            "gguf: unknown BPE pre-tokenizer (probe hash %s); llama.cpp will split text with its default "
            "rule, so its tokens may differ from transformers' (token ids fed directly are unaffected)",
            digest[:12],
        )
        return "default"
    return name


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as the GGUF will hold it, read and checked in full before anything is written."""

    model: str  # tokenizer.ggml.model: gpt2 or llama
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # llama only
    add_space_prefix: bool | None  # llama only
    merges: list[str]  # gpt2 only
    special: gguf.SpecialVocab  # special ids, whether BOS/EOS are added, the chat template

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Tokens, their types, merges or scores, special ids and the chat template."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.merges:
            writer.add_token_merges(self.merges)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(checkpoint: Path, config: Mapping[str, Any], vocab_size: int) -> Vocab:
    """The checkpoint's tokenizer for a GGUF of ``vocab_size`` tokens, or a UserError naming the file
    and what is wrong (``tokenizer_json``, ``tokenizer_files``); nothing is written here.

    tokenizer.json is read once, checked, and built by the tokenizers library as written: not through
    transformers, which would also apply tokenizer_config.json, special_tokens_map.json and
    added_tokens.json (a family's class, or a special token named there and missing here, adds tokens;
    their shapes are transformers' to check, version by version). ``config`` is config.json as read.
    """
    path = checkpoint / "tokenizer.json"
    if not os.path.lexists(path):
        raise UserError(
            f"{checkpoint}: no tokenizer.json; the GGUF needs the tokenizer (save it with the model)"
        )
    data = read_json_object(path)  # a FIFO, a directory, bad bytes or bad syntax is one line
    model = check_tokenizer_json(data, vocab_size, str(path))
    tokenizer = parse_tokenizer(data, str(path))
    check_tokenizer_side_files(checkpoint, config, vocab_size)
    tokens, types = _byte_level_tokens(tokenizer, vocab_size)
    # SpecialVocab re-reads the files just checked; merges come from the checked data, never merges.txt
    special = gguf.SpecialVocab(checkpoint, load_merges=False)
    if model == BYTE_LEVEL:
        pre = pre_tokenizer(tokenizer.encode(PROBE_TEXT).ids)
        return Vocab(model, pre, tokens, types, None, None, _merges(data["model"]["merges"]), special)
    scores, types = _byte_fallback_scores(tokens, types)
    return Vocab(model, "default", tokens, types, scores, _adds_space_prefix(data), [], special)


def _merges(merges: list[Any]) -> list[str]:
    """Merges as llama.cpp reads them, "left right", from either form tokenizer.json uses (a space
    inside a piece of the pair form is written as U+0120+256, as gguf's SpecialVocab does)."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def _byte_fallback_scores(tokens: list[str], types: list[int]) -> tuple[list[float], list[int]]:
    """SentencePiece-style BPE (Llama 2, Mistral) for llama.cpp's ``llama`` tokenizer, which merges the
    pair whose result scores highest. tokenizer.json keeps no scores, but its ids follow the merge
    order (SentencePiece numbers pieces by score), so a piece's score is minus its id."""
    scores = [-float(i) if kind == gguf.TokenType.NORMAL else 0.0 for i, kind in enumerate(types)]
    # a byte piece is BYTE however the tokenizer lists it (in the vocabulary, or as an added token)
    types = [
        gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else kind
        for text, kind in zip(tokens, types, strict=True)
    ]
    return scores, types


def _adds_space_prefix(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text: a ``Prepend`` normalizer (Llama 2, Mistral) or a
    ``Metaspace`` pre-tokenizer that prepends (newer exports); llama.cpp must do the same."""

    def parts(entry: Any) -> list[Mapping[str, Any]]:
        if not isinstance(entry, Mapping):
            return []
        return [
            p for child in entry.get("normalizers", entry.get("pretokenizers", [])) for p in parts(child)
        ] or [entry]

    for part in parts(tokenizer_json.get("normalizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
    return any(
        part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never"
        for part in parts(tokenizer_json.get("pre_tokenizer"))
    )


def _byte_level_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type: special added tokens are CONTROL, other added ones USER_DEFINED,
    ids the tokenizer does not use are padded as UNUSED (as llama.cpp's converter does). The ids were
    checked against ``vocab_size`` (``check_tokenizer_json``)."""
    by_id = {i: text for text, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
