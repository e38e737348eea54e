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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf

from pruning.errors import UserError
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


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, found as its converter finds it."""
    digest = hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        logger.warning(
            "gguf: unknown BPE pre-tokenizer (probe hash %s); llama.cpp will split text with its default "
            "rule, so its tokens may differ from transformers' (token ids fed directly are unaffected)",
            digest[:12],
        )
        return "default"
    return name


def write_vocab(writer: gguf.GGUFWriter, checkpoint: Path, vocab_size: int) -> None:
    """Tokens, their types, merges or scores, special ids and the chat template."""
    from transformers import PreTrainedTokenizerFast

    if not (checkpoint / "tokenizer.json").is_file():
        raise UserError(
            f"{checkpoint}: no tokenizer.json; the GGUF needs the tokenizer (save it with the model)"
        )
    # tokenizer.json as written, without the model config: a pruned checkpoint's config names modeling
    # code (which must not be run or prompted for), and a family's tokenizer class may add tokens.
    data = read_json_object(checkpoint / "tokenizer.json")  # once, and a broken file is one line
    model = tokenizer_model_of(data, f"{checkpoint}/tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    if model == "gpt2":
        tokens, types = _byte_level_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        tokens, scores, types = _byte_fallback_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(data))
    gguf.SpecialVocab(checkpoint, load_merges=model == "gpt2").add_to_gguf(writer, quiet=True)


def tokenizer_model_of(tokenizer_json: Mapping[str, Any], source: str) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (BPE with byte fallback) for a tokenizer.json's content;
    anything else is refused, naming ``source``."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"{source}: a {model.get('type')} tokenizer; the GGUF export writes BPE tokenizers (byte-level "
            "or with byte fallback)"
        )
    return "llama" if model.get("byte_fallback") else "gpt2"


def _byte_fallback_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style BPE (Llama 2, Mistral) for llama.cpp's ``llama`` tokenizer, which merges the
    pair whose result scores highest. tokenizer.json keeps no scores, but its ids follow the merge
    order (SentencePiece numbers pieces by score), so a piece's score is minus its id."""
    tokens, types = _byte_level_tokens(tokenizer, vocab_size)
    scores = [-float(i) if kind == gguf.TokenType.NORMAL else 0.0 for i, kind in enumerate(types)]
    # a byte piece is BYTE however the tokenizer lists it (in the vocabulary, or as an added token)
    types = [
        gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else kind
        for text, kind in zip(tokens, types, strict=True)
    ]
    return tokens, scores, types


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
    ids the tokenizer does not use are padded as UNUSED (as llama.cpp's converter does)."""
    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(
            f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
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
