"""The files beside tokenizer.json that the GGUF export reads, checked before it reads them for real.

gguf's ``SpecialVocab`` (llama.cpp's own reader, used so that the special ids and the chat template are
found as llama.cpp's converter finds them) reads tokenizer_config.json, chat_template.jinja (and
additional_chat_templates/), chat_template.json and config.json's ``*_token_id`` with plain ``open``
and ``json.load``, and trusts their shapes: a list where it wants an object, bytes that are not UTF-8
or an id of -1 escape as a traceback, and an id past the vocabulary would be written into the GGUF.
Each is checked here first, with the same one-line refusals as every other file the tool reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.export.tokenizer_json import describe, show
from pruning.storage.fs import MAX_JSON_BYTES, read_text_file_bounded
from pruning.storage.json_files import read_json_object

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # SpecialVocab's default types


def check_tokenizer_side_files(checkpoint: Path, config: Mapping[str, Any], vocab_size: int) -> None:
    """Refuse, naming the file and key, any of those files that ``SpecialVocab`` would choke on or
    misread. ``config`` is config.json as already read; the others are read here (bounded)."""
    config_path = checkpoint / "tokenizer_config.json"
    if os.path.lexists(config_path):
        tokenizer_config = read_json_object(config_path)
        for typ in SPECIAL_TYPES:
            _check_special_token(tokenizer_config.get(f"{typ}_token"), f"{config_path}: {typ}_token")
            add = tokenizer_config.get(f"add_{typ}_token")
            if add is not None and not isinstance(add, bool):
                raise UserError(f"{config_path}: add_{typ}_token: expected a boolean, got {describe(add)}")
        _check_chat_template(tokenizer_config.get("chat_template"), f"{config_path}: chat_template")
    jinja = checkpoint / "chat_template.jinja"
    for path in (jinja, *sorted((checkpoint / "additional_chat_templates").glob("*.jinja"))):
        if os.path.lexists(path):
            read_text_file_bounded(path, what="chat template", limit=MAX_JSON_BYTES)
    json_path = checkpoint / "chat_template.json"
    if os.path.lexists(json_path):
        _check_chat_template(read_json_object(json_path).get("chat_template"), f"{json_path}: chat_template")
    _check_special_ids(config, f"{checkpoint / 'config.json'}: ", vocab_size)
    text_config = config.get("text_config")
    if text_config is not None:  # SpecialVocab looks there for an id the top level lacks
        if not isinstance(text_config, dict):
            raise UserError(
                f"{checkpoint / 'config.json'}: text_config: expected an object, got {describe(text_config)}"
            )
        _check_special_ids(text_config, f"{checkpoint / 'config.json'}: text_config.", vocab_size)


def _check_special_token(value: Any, where: str) -> None:
    """A special token as tokenizer_config.json writes it: its text, or an object whose ``content`` is."""
    if value is None or isinstance(value, str):
        return
    if not (isinstance(value, dict) and isinstance(value.get("content"), str)):
        expected = 'a string or an object with a string "content"'
        raise UserError(f"{where}: expected {expected}, got {describe(value)}")


def _check_chat_template(value: Any, where: str) -> None:
    """One template (a string) or named ones (``[{"name": ..., "template": ...}]``), as GGUFWriter takes."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a string or an array of named templates, got {describe(value)}")
    for i, entry in enumerate(value):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        ):
            raise UserError(
                f'{where}[{i}]: expected {{"name": string, "template": string}}, got {describe(entry)}'
            )


def _check_special_ids(config: Mapping[str, Any], where: str, vocab_size: int) -> None:
    """``*_token_id`` that SpecialVocab takes (a single integer; a list, as Llama 3's eos, it skips)."""
    for typ in SPECIAL_TYPES:
        value = config.get(f"{typ}_token_id")
        if isinstance(value, bool) or (isinstance(value, int) and not 0 <= value < vocab_size):
            raise UserError(
                f"{where}{typ}_token_id: {show(value)} is not a token id in the vocabulary "
                f"(0..{vocab_size - 1})"
            )
