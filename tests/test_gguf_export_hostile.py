"""The GGUF export CLI against hostile inputs: tokenizer files of the wrong shape, output paths that hold
something. Each case is one stderr line ``error: <file>: <what is wrong>``, exit code 2, and nothing
written: no output, no temporary file, no directory made, whatever was at the output path unchanged.

One tiny checkpoint is built for the module; each case spoils a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pruning.checkpoint.save import save_pruned_model
from pruning.export.cli import main
from tests.tiny_models import tiny_model
from tests.tiny_pipeline import build_tokenizer

VOCAB = 300  # the model's vocab_size, and the tokenizer's: ids 0..299


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint") / "model"
    return save_pruned_model(tiny_model("llama_gqa", vocab_size=VOCAB), build_tokenizer(VOCAB), directory)


@pytest.fixture
def checkpoint(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the CLI printed, after checking exit code 2 and that it is the only line."""
    capsys.readouterr()
    code = main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not os.path.lexists(out.parent), "the output's directory was made"
    leftovers = [p for p in tmp_path.rglob("*") if ".partial-" in p.name or p.suffix == ".gguf"]
    assert leftovers == []


def export_refused(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "out" / "m.gguf"
    line = refused([str(checkpoint), str(out)], capsys)
    assert_nothing_written(tmp_path, out)
    return line


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Apply ``change`` to the file's JSON (in place, or the value it returns replaces the whole)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    replaced = change(data)
    path.write_text(json.dumps(data if replaced is None else replaced), encoding="utf-8")


def drop(mapping: dict[str, Any], key: str) -> None:
    del mapping[key]


def first_merge(data: dict[str, Any]) -> list[str]:
    return data["model"]["merges"][0]


# tokenizer.json: (case, change, what the line must say after "tokenizer.json: ")
TOKENIZER_JSON = [
    ("not_an_object", lambda d: [d], "expected a JSON object"),
    ("model_a_number", lambda d: d.update(model=5), "model: expected an object, got a number 5"),
    ("model_type_missing", lambda d: drop(d["model"], "type"), "model.type: expected a string"),
    ("not_bpe", lambda d: d["model"].update(type="Unigram"), 'model.type: a "Unigram" tokenizer'),
    ("byte_fallback_a_string", lambda d: d["model"].update(byte_fallback="yes"), "model.byte_fallback"),
    ("subword_prefix", lambda d: d["model"].update(continuing_subword_prefix="##"), "no subword affixes"),
    (
        "vocab_a_list",
        lambda d: d["model"].update(vocab=list(d["model"]["vocab"].items())),
        "model.vocab: expected an object mapping each token to its id, got an array",
    ),
    (
        "id_out_of_all_range",
        lambda d: d["model"]["vocab"].update({"Ġt": 99999999999}),
        'model.vocab["Ġt"]: id 99999999999 is outside the vocabulary (0..299)',
    ),
    (
        "id_one_past_vocab_size",
        lambda d: d["model"]["vocab"].update({"Ġt": VOCAB}),
        'model.vocab["Ġt"]: id 300 is outside the vocabulary (0..299)',
    ),
    ("id_negative", lambda d: d["model"]["vocab"].update({"Ġt": -1}), "id -1 is outside the vocabulary"),
    ("id_a_float", lambda d: d["model"]["vocab"].update({"Ġt": 3.5}), "expected an integer token id"),
    ("id_a_boolean", lambda d: d["model"]["vocab"].update({"Ġt": True}), "got a boolean true"),
    ("id_a_string", lambda d: d["model"]["vocab"].update({"Ġt": "3"}), 'got a string "3"'),
    (
        "id_duplicated",
        lambda d: d["model"]["vocab"].update({"Ġt": d["model"]["vocab"]["!"]}),
        'model.vocab["Ġt"]: id 2 is also the id of "!"',
    ),
    (
        "token_with_a_line_separator",  # the message shows it escaped, on one line
        lambda d: d["model"]["vocab"].update({"a\u2028b\nc": VOCAB}),
        'model.vocab["a\\u2028b\\nc"]: id 300 is outside',
    ),
    ("merges_a_number", lambda d: d["model"].update(merges=5), "model.merges: expected an array of merges"),
    (
        "merges_of_two_forms",
        lambda d: d["model"]["merges"].append("Ġ t"),
        'expected a pair of strings ["left", "right"], got a string "Ġ t"',
    ),
    (
        "merge_of_numbers",
        lambda d: d["model"]["merges"].insert(0, [1, 2]),
        "model.merges[0]: expected a pair",
    ),
    ("merge_of_three", lambda d: first_merge(d).append("x"), "model.merges[0]: expected a pair"),
    ("merge_string_of_three", lambda d: d["model"].update(merges=["a b c"]), "model.merges[0]: expected"),
    ("merge_piece_unknown", lambda d: first_merge(d).__setitem__(0, "zzz"), '"zzz" is not in model.vocab'),
    (
        "merged_token_unknown",  # a hole where a merge's result should be
        lambda d: drop(d["model"]["vocab"], "Ġt"),
        'model.merges[0]: the merged token "Ġt" is not in model.vocab',
    ),
    ("added_tokens_an_object", lambda d: d.update(added_tokens={"a": 1}), "added_tokens: expected an array"),
    ("added_token_a_string", lambda d: d["added_tokens"].append("x"), "added_tokens[2]: expected an object"),
    (
        "added_token_id_negative",
        lambda d: d["added_tokens"][0].update(id=-5),
        "added_tokens[0].id: id -5 is outside the vocabulary (0..299)",
    ),
    ("added_token_id_missing", lambda d: drop(d["added_tokens"][0], "id"), "got nothing"),
    ("added_token_content_a_number", lambda d: d["added_tokens"][0].update(content=7), "[0].content"),
    ("added_token_content_empty", lambda d: d["added_tokens"][0].update(content=""), "empty"),
    ("added_token_special_a_string", lambda d: d["added_tokens"][0].update(special="y"), "[0].special"),
    (
        "added_token_on_another_tokens_id",
        lambda d: d["added_tokens"].append({**d["added_tokens"][0], "id": 5, "content": "<x>"}),
        'added_tokens[2]: id 5 is "$" in model.vocab, not "<x>"',
    ),
    (
        "added_token_with_another_id_than_in_vocab",
        lambda d: d["added_tokens"][0].update(content="!"),
        'added_tokens[0]: id 0 is "<s>" in model.vocab, not "!"',
    ),
    (
        "added_token_twice",
        lambda d: d["added_tokens"].append(dict(d["added_tokens"][0])),
        "added_tokens[2]: id 0 is also the id of added_tokens[0]",
    ),
    ("pre_tokenizer_a_number", lambda d: d.update(pre_tokenizer=5), "pre_tokenizer: expected an object"),
    (
        "pre_tokenizer_steps_not_an_array",
        lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": 5}),
        "pre_tokenizer.pretokenizers: expected an array",
    ),
    (
        "normalizer_step_type_a_number",
        lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": 5}]}),
        "normalizer.normalizers[0].type: expected a string",
    ),
    ("normalizer_an_array", lambda d: d.update(normalizer=[1]), "normalizer: expected an object"),
    ("post_processor_a_number", lambda d: d.update(post_processor=5), "post_processor: expected an object"),
    (
        "post_processor_template_piece_a_number",
        lambda d: d["post_processor"].update(single=[5, 6]),
        "post_processor.single[0]: expected an object",
    ),
    (
        "post_processor_special_token_id_a_number",
        lambda d: d["post_processor"].update(single=[{"SpecialToken": {"id": 1, "type_id": 0}}]),
        "post_processor.single[0].SpecialToken.id: expected a string",
    ),
    (
        "post_processor_processors_an_object",
        lambda d: d.update(post_processor={"type": "Sequence", "processors": {}}),
        "post_processor.processors: expected an array",
    ),
    (
        "what_only_the_library_reads",  # the decoder: the tokenizers library's refusal, in one line
        lambda d: d.update(decoder={"type": "NoSuchDecoder"}),
        "the tokenizers library cannot build it",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"), [c[1:] for c in TOKENIZER_JSON], ids=[c[0] for c in TOKENIZER_JSON]
)
def test_tokenizer_json_of_the_wrong_shape_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, expected: str
) -> None:
    edit_json(checkpoint / "tokenizer.json", change)
    line = export_refused(checkpoint, tmp_path, capsys)
    assert line.startswith(f"error: {checkpoint / 'tokenizer.json'}: ") and expected in line, line


SIDE_FILES = [
    ("tokenizer_config.json", "[1]", "tokenizer_config.json: expected a JSON object"),
    ("tokenizer_config.json", '{"bos_token": 5}', "tokenizer_config.json: bos_token: expected a string"),
    ("tokenizer_config.json", '{"eos_token": {"content": 5}}', "tokenizer_config.json: eos_token"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', "tokenizer_config.json: add_bos_token"),
    ("tokenizer_config.json", '{"chat_template": 5}', "tokenizer_config.json: chat_template: expected"),
    ("tokenizer_config.json", '{"chat_template": [5]}', "tokenizer_config.json: chat_template[0]"),
    ("chat_template.json", "[1]", "chat_template.json: expected a JSON object"),
    ("chat_template.json", '{"chat_template": {"a": 1}}', "chat_template.json: chat_template"),
]


@pytest.mark.parametrize(("name", "text", "expected"), SIDE_FILES)
def test_tokenizer_side_files_of_the_wrong_shape_are_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, expected: str
) -> None:
    (checkpoint / name).write_text(text, encoding="utf-8")
    line = export_refused(checkpoint, tmp_path, capsys)
    assert line.startswith(f"error: {checkpoint}/") and expected in line, line


def test_a_chat_template_that_is_not_utf8_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (checkpoint / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff\xfe")
    line = export_refused(checkpoint, tmp_path, capsys)
    assert f"{checkpoint / 'chat_template.jinja'}: " in line and "not UTF-8" in line, line


@pytest.mark.parametrize(("value", "shown"), [(-1, "-1"), (99999, "99999"), (True, "true")])
def test_a_special_token_id_outside_the_vocabulary_in_config_json_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object, shown: str
) -> None:
    edit_json(checkpoint / "config.json", lambda c: c.update(bos_token_id=value))
    line = export_refused(checkpoint, tmp_path, capsys)
    assert f"config.json: bos_token_id: {shown} is not a token id in the vocabulary (0..299)" in line, line


def test_a_tokenizer_json_that_is_a_fifo_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (checkpoint / "tokenizer.json").unlink()
    os.mkfifo(checkpoint / "tokenizer.json")  # opened for reading, it would block forever
    line = export_refused(checkpoint, tmp_path, capsys)
    assert f"{checkpoint / 'tokenizer.json'}: not a regular file" in line, line


# ------------------------------------------------------------------------------------ the output path


def refused_at(checkpoint: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    line = refused([str(checkpoint), str(out)], capsys)
    assert line.startswith(f"error: {out}: "), line
    leftovers = [p for p in out.parent.iterdir() if ".partial-" in p.name] if out.parent.is_dir() else []
    assert leftovers == []
    return line


def test_a_dangling_link_at_the_output_path_is_named_and_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    for target in (tmp_path / "absent.gguf", tmp_path / "no-such-dir" / "m.gguf"):
        out.symlink_to(target)
        line = refused_at(checkpoint, out, capsys)
        assert f"is a symbolic link to {target}, which does not exist" in line, line
        assert os.readlink(out) == str(target) and not os.path.exists(target)
        assert not (tmp_path / "no-such-dir").exists()
        out.unlink()


def test_a_link_loop_or_a_link_to_a_file_at_the_output_path_is_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    out.symlink_to(out)
    assert "which leads round in a loop of links" in refused_at(checkpoint, out, capsys)
    out.unlink()
    user_file = tmp_path / "user.gguf"
    user_file.write_bytes(b"user data")
    out.symlink_to(user_file)
    line = refused_at(checkpoint, out, capsys)
    assert f"is a symbolic link to {user_file}; the export writes a new file, never through a link" in line
    assert out.is_symlink() and user_file.read_bytes() == b"user data"


def test_a_directory_fifo_or_device_at_the_output_path_is_named_and_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "d.gguf"
    (directory / "inside").mkdir(parents=True)
    assert "is a directory; give the name of the .gguf file" in refused_at(checkpoint, directory, capsys)
    assert [p.name for p in directory.iterdir()] == ["inside"]
    fifo = tmp_path / "f.gguf"
    os.mkfifo(fifo)
    assert "is a FIFO (named pipe); the export writes a new file" in refused_at(checkpoint, fifo, capsys)
    assert fifo.is_fifo()
    device = Path(os.devnull)
    assert "is a character device" in refused_at(checkpoint, device, capsys)
    assert device.is_char_device()


def test_a_dangling_link_above_the_output_is_named(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link, target = tmp_path / "link", tmp_path / "gone"
    link.symlink_to(target)
    out = link / "sub" / "m.gguf"
    line = refused_at(checkpoint, out, capsys)
    assert f"cannot write here: {link} is a symbolic link to {target}, which does not exist" in line, line
    assert not target.exists() and link.is_symlink()
