"""Config loading: the shipped YAMLs, ``--set`` overrides, one-line errors naming key path and rule."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pruning.config import (
    MAX_MESSAGE_CHARS,
    CalibrationConfig,
    CompensationConfig,
    HookConfig,
    ModelConfig,
    OutputConfig,
    PipelineConfig,
    PruningConfig,
    WeightedSource,
    expanded_size,
    load_config,
    validate_config,
)
from pruning.errors import UserError
from tests.tiny_pipeline import REPO

SMOLLM2 = REPO / "configs" / "smollm2_0.2.yaml"
LLAMA2 = REPO / "configs" / "llama2_0.2.yaml"


def write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def minimal() -> dict:
    return {"model": {"path": "some/model"}, "pruning": {"ratio": 0.2}}


def user_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- shipped


def test_smollm2_config_values():
    config = load_config(SMOLLM2)
    assert config == PipelineConfig(
        name="smollm2_0.2",
        model=ModelConfig(path="smollm2-135m", dtype="float32", device_map="cpu"),
        calibration=CalibrationConfig(
            sources=(
                WeightedSource("data/wikitext-2-raw/wiki.valid.raw", 0.9),
                WeightedSource("builtin:python-code", 0.05),
                WeightedSource("builtin:python-docs", 0.05),
            ),
            num_samples=128,
            seq_len=256,
            batch_size=4,
            seed=0,
            fisher_samples=16,
        ),
        compensation=CompensationConfig(method="refit", ridge=0.001, selection="obs", obs_steps=32),
        pruning=PruningConfig(
            ratio=0.2,
            ratio_of="total",
            importance="obs_fisher",
            protected_layers=(),
            min_kv_groups=0,
            uniform=False,
            multiple_of=64,
            heads_multiple_of=1,
        ),  # fmt: skip
        output=OutputConfig(dir="results/smollm2_0.2", overwrite=False),
        hooks=(
            HookConfig(name="analysis", params={"lang": "en", "verbose": True}, on_error="raise"),
            HookConfig(
                name="perplexity",
                params={"text": "data/wikitext-2-raw/wiki.test.raw", "protocol": "quick", "batch_size": 1},
            ),
            HookConfig(name="plot"),
        ),
        source_file=str(SMOLLM2),
    )
    assert isinstance(config.pruning.ratio, float) and isinstance(config.calibration.num_samples, int)
    assert isinstance(config.pruning.protected_layers, tuple)


def test_llama2_config_values():
    config = load_config(LLAMA2)
    assert config.name == "llama2_0.2"
    assert config.model == ModelConfig(path="meta-llama/Llama-2-7b-hf", dtype="bfloat16", device_map="auto")
    assert (config.calibration.num_samples, config.calibration.seq_len) == (128, 512)
    assert config.pruning.ratio == 0.2 and config.pruning.ratio_of == "total"
    assert config.output.dir == "results/llama2_0.2"
    assert [h.name for h in config.hooks] == ["analysis"] and config.hooks[0].on_error == "raise"


def test_defaults_from_a_minimal_config(tmp_path: Path):
    config = load_config(write(tmp_path, minimal(), "my-run.yaml"))
    assert config.name == "my-run"  # the file's stem
    assert config.model == ModelConfig(path="some/model", dtype="float32", device_map="cpu")
    assert config.calibration == CalibrationConfig()
    assert config.calibration.source == "data/wikitext-2-raw/wiki.valid.raw"
    assert config.pruning == PruningConfig(ratio=0.2)
    assert config.pruning.importance == "activation" and config.pruning.protected_layers == ()
    assert config.output == OutputConfig(dir=str(Path("results") / "my-run"), overwrite=False)
    assert config.hooks == ()


def test_hook_given_as_a_string_gets_default_params(tmp_path: Path):
    config = load_config(
        write(tmp_path, {**minimal(), "hooks": ["analysis", {"name": "x:Y", "on_error": "warn"}]})
    )
    assert config.hooks == (HookConfig("analysis", {}, "raise"), HookConfig("x:Y", {}, "warn"))


def test_documented_config_example_is_valid():
    text = (REPO / "docs" / "running.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("name: smollm2_0.2"))
    raw = yaml.safe_load(block)
    validate_config(raw, "docs/running.md")
    shipped = yaml.safe_load(SMOLLM2.read_text(encoding="utf-8"))
    assert raw == shipped  # the documented example is what the shipped config says


# ---------------------------------------------------------------------------------------------- --set


def test_overrides_are_typed_as_yaml():
    config = load_config(
        SMOLLM2,
        [
            "pruning.ratio=0.3",
            "calibration.num_samples=16",
            "output.overwrite=true",
            "pruning.protected_layers=[0, 1]",
            "model.path=other/model",
        ],
    )
    assert config.pruning.ratio == 0.3 and isinstance(config.pruning.ratio, float)
    assert config.calibration.num_samples == 16 and type(config.calibration.num_samples) is int
    assert config.output.overwrite is True
    assert config.pruning.protected_layers == (0, 1)
    assert config.model.path == "other/model"
    assert config.calibration.seq_len == 256  # untouched keys keep the file's values


def test_override_creates_a_missing_section(tmp_path: Path):
    config = load_config(write(tmp_path, minimal()), ["output.dir=elsewhere", "calibration.seed=7"])
    assert config.output.dir == "elsewhere" and config.calibration.seed == 7


def test_later_override_wins():
    assert load_config(SMOLLM2, ["pruning.ratio=0.3", "pruning.ratio=0.4"]).pruning.ratio == 0.4


def test_overridden_value_is_validated():
    message = user_error(SMOLLM2, ["pruning.ratio=1.5"])
    assert "pruning.ratio" in message and "1.5 is greater than or equal to the maximum of 1" in message


@pytest.mark.parametrize("override", ["pruning.ratio", "=0.3", "  =1"])
def test_override_without_key_or_equals(override: str):
    message = user_error(SMOLLM2, [override])
    assert message.startswith(f"--set {override!r}") and "expected key.path=value" in message


def test_override_into_a_scalar_is_refused():
    message = user_error(SMOLLM2, ["model.path.deep=1"])
    assert "'path' is not a section" in message


# ---------------------------------------------------------------------------------------------- errors


def mutate(section: str | None, key: str, value: object) -> dict:
    raw = yaml.safe_load(SMOLLM2.read_text(encoding="utf-8"))
    target = raw if section is None else raw[section]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return raw


_DELETE = object()

BAD = [
    # (section, key, value, key path in the message, rule in the message)
    (None, "colour", "red", "(top level)", "Additional properties are not allowed ('colour' was unexpected)"),
    ("pruning", "rato", 0.2, "pruning", "Additional properties are not allowed ('rato' was unexpected)"),
    ("calibration", "seqlen", 8, "calibration", "('seqlen' was unexpected)"),
    ("pruning", "ratio", "0.2", "pruning.ratio", "'0.2' is not of type 'number'"),
    ("calibration", "num_samples", 1.5, "calibration.num_samples", "is not of type 'integer'"),
    ("calibration", "num_samples", True, "calibration.num_samples", "is not of type 'integer'"),
    ("output", "overwrite", "yes", "output.overwrite", "'yes' is not of type 'boolean'"),
    ("pruning", "ratio", 0, "pruning.ratio", "0 is less than or equal to the minimum of 0"),
    ("pruning", "ratio", 1, "pruning.ratio", "1 is greater than or equal to the maximum of 1"),
    ("pruning", "ratio", 1.5, "pruning.ratio", "1.5 is greater than or equal to the maximum of 1"),
    ("pruning", "ratio", -0.1, "pruning.ratio", "-0.1 is less than or equal to the minimum of 0"),
    ("pruning", "ratio_of", "params", "pruning.ratio_of", "'params' is not one of ['total', 'layers']"),
    ("pruning", "importance", "random", "pruning.importance", "is not one of"),
    ("pruning", "protected_layers", [0, 0], "pruning.protected_layers", "has non-unique elements"),
    ("pruning", "protected_layers", [-1], "pruning.protected_layers[0]", "less than the minimum of 0"),
    ("model", "dtype", "fp8", "model.dtype", "'fp8' is not one of"),
    ("model", "device_map", "gpu", "model.device_map", "does not match"),
    ("model", "device_map", {"model.layers.0": "gpu"}, "model.device_map.model.layers.0", "does not match"),
    ("model", "streaming", "yes", "model.streaming", "is not one of ['auto', 'always', 'never']"),
    ("model", "max_memory", {"cpu": "lots"}, "model.max_memory.cpu", "does not match"),
    ("model", "max_memory", {"gpu0": "1GB"}, "model.max_memory", "'gpu0' does not match"),
    (None, "model", _DELETE, "(top level)", "'model' is a required property"),
    ("model", "path", _DELETE, "model", "'path' is a required property"),
    ("model", "path", "", "model.path", "should be non-empty"),
    (None, "name", "a b", "name", "does not match"),
    (None, "hooks", "analysis", "hooks", "'analysis' is not of type 'array'"),
    (None, "hooks", [{"name": "analysis", "on_error": "ignore"}], "hooks[0].on_error", "is not one of"),
    (None, "hooks", [{"params": {}}], "hooks[0]", "'name' is a required property"),
    (None, "hooks", [{"name": "analysis", "prams": {}}], "hooks[0]", "('prams' was unexpected)"),
    (None, "hooks", [5], "hooks[0]", "is not valid under any of the given schemas"),
    (None, "hooks", ["analysis", ""], "hooks[1]", "should be non-empty"),
    ("output", "max_shard_size", "5 gigabytes", "output.max_shard_size", "does not match"),
    ("calibration", "engine", "streaming", "calibration.engine", "is not one of"),
]


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), (" 1.5 GB ", 1_500_000_000), ("100KB", 100_000)],
)
def test_shard_sizes_in_decimal_and_binary_units(text: str, size: int):
    from pruning.config import size_in_bytes

    assert size_in_bytes(text) == size


@pytest.mark.parametrize(("value", "rule"), [("0GB", "not a positive size"), ("5gb", "does not match")])
def test_bad_shard_size_is_one_line(tmp_path: Path, value: str, rule: str):
    message = user_error(write(tmp_path, mutate("output", "max_shard_size", value)))
    assert "output.max_shard_size" in message and rule in message


@pytest.mark.parametrize(("section", "key", "value", "where", "rule"), BAD)
def test_bad_config_names_key_path_and_rule(tmp_path: Path, section, key, value, where, rule):
    path = write(tmp_path, mutate(section, key, value))
    message = user_error(path)
    assert message.startswith(f"{path}: {where}: "), message
    assert rule in message


def test_missing_pruning_section(tmp_path: Path):
    message = user_error(write(tmp_path, {"model": {"path": "m"}}))
    assert "(top level): 'pruning' is a required property" in message


def test_missing_ratio(tmp_path: Path):
    message = user_error(write(tmp_path, {"model": {"path": "m"}, "pruning": {}}))
    assert "pruning: 'ratio' is a required property" in message


def test_invalid_yaml_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, "model:\n  path: m\npruning: {ratio: 0.2\n")
    message = user_error(path)
    assert message.startswith(f"{path}: not valid YAML at line ") and "column" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str):
    message = user_error(write(tmp_path, text))
    assert "the config must be a YAML mapping" in message


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    assert user_error(path) == f"{path}: config file not found"


def test_validate_config_rejects_non_mapping():
    with pytest.raises(UserError, match=r"^cfg: \(top level\): \[1\] is not of type 'object'"):
        validate_config([1], "cfg")


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", [SMOLLM2, LLAMA2])
def test_to_dict_round_trips(tmp_path: Path, path: Path):
    config = load_config(path, ["pruning.protected_layers=[2, 5]", "output.overwrite=true"])
    data = config.to_dict()
    validate_config(data, "to_dict")
    assert "source_file" not in data and data["pruning"]["protected_layers"] == [2, 5]
    assert data["hooks"] == [dataclasses.asdict(h) for h in config.hooks]
    again = load_config(write(tmp_path, data, "again.yaml"))
    assert dataclasses.replace(again, source_file=config.source_file) == config


def test_duplicate_keys_are_refused_in_files_and_overrides(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {path: m}\npruning:\n  ratio: 0.2\n  ratio: 0.5\n")
    with pytest.raises(UserError, match=r"dup.yaml: not valid YAML at line 4, column 3: duplicate key"):
        load_config(path)
    path.write_text("model: {path: m}\npruning: {ratio: 0.2}\n")
    with pytest.raises(UserError, match="value is not valid YAML"):
        load_config(path, ["pruning={ratio: 0.2, ratio: 0.3}"])


def test_the_old_device_key_says_what_replaced_it(tmp_path: Path):
    raw = minimal()
    raw["model"]["device"] = "auto"
    with pytest.raises(UserError, match=r"model.device was renamed model.device_map, where auto means"):
        load_config(write(tmp_path, raw))


def test_max_memory_reaches_accelerate_as_bytes_with_gpu_indices(tmp_path: Path):
    raw = minimal()
    raw["model"]["max_memory"] = {0: "20GiB", "1": "1.5GB", "cpu": "512MiB"}
    config = load_config(write(tmp_path, raw))
    assert config.model.max_memory_bytes() == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 512 * 2**20}


def test_gradient_checkpointing_without_taylor_is_refused(tmp_path: Path):
    raw = minimal()
    raw["calibration"] = {"gradient_checkpointing": True}
    with pytest.raises(
        UserError, match=r"gradient_checkpointing applies only to the criteria that take it \(taylor\)"
    ):
        load_config(write(tmp_path, raw))
    raw["pruning"]["importance"] = "taylor"
    assert load_config(write(tmp_path, raw)).calibration.gradient_checkpointing


def test_selection_without_refit_is_refused(tmp_path: Path):
    raw = minimal()
    raw["compensation"] = {"selection": "obs"}
    message = user_error(write(tmp_path, raw))
    assert "compensation.selection: obs" in message and "compensation.method: refit (it is none)" in message
    raw["compensation"]["method"] = "refit"
    assert load_config(write(tmp_path, raw)).compensation.selection == "obs"


def test_calibration_sources_give_a_weighted_mix_and_round_trip(tmp_path: Path):
    raw = minimal()
    raw["calibration"] = {
        "sources": [{"source": "a.raw", "weight": 0.75}, {"source": "builtin:python-code", "weight": 0.25}]
    }
    raw["compensation"] = {"method": "refit", "ridge": 0.01}
    config = load_config(write(tmp_path, raw))
    assert [(s.source, s.weight) for s in config.calibration.mix()] == [
        ("a.raw", 0.75),
        ("builtin:python-code", 0.25),
    ]
    assert config.calibration.describe() == "a.raw 0.75 + builtin:python-code 0.25"
    assert (config.compensation.method, config.compensation.ridge) == ("refit", 0.01)
    data = config.to_dict()
    assert "source" not in data["calibration"] and data["calibration"]["sources"][1]["weight"] == 0.25
    again = load_config(write(tmp_path, data, "again.yaml"))
    assert dataclasses.replace(again, source_file=config.source_file) == config


def test_one_source_is_a_mix_of_one_and_compensation_is_off_by_default(tmp_path: Path):
    config = load_config(write(tmp_path, minimal()))
    assert [(s.source, s.weight) for s in config.calibration.mix()] == [(config.calibration.source, 1.0)]
    assert config.compensation.method == "none"
    assert "sources" not in config.to_dict()["calibration"]


@pytest.mark.parametrize(
    ("calibration", "compensation", "message"),
    [
        ({"source": "a.raw", "sources": [{"source": "b.raw", "weight": 1}]}, {}, "give source (one text) or"),
        ({"sources": []}, {}, "calibration.sources: [] should be non-empty"),
        ({"sources": [{"source": "b.raw", "weight": 0}]}, {}, "sources[0].weight: 0 is less than"),
        ({"sources": [{"source": "b.raw"}]}, {}, "calibration.sources[0]: 'weight' is a required property"),
        ({}, {"method": "obs"}, "compensation.method: 'obs' is not one of"),
        ({}, {"ridge": 0}, "compensation.ridge: 0 is less than or equal"),
    ],
)
def test_bad_sources_and_compensation_are_one_line(tmp_path: Path, calibration, compensation, message):
    raw = minimal()
    raw["calibration"], raw["compensation"] = calibration, compensation
    assert message in user_error(write(tmp_path, raw))


def test_setting_one_calibration_text_replaces_the_files_mix():
    config = load_config(SMOLLM2, ["calibration.source=my.txt"])
    assert [(s.source, s.weight) for s in config.calibration.mix()] == [("my.txt", 1.0)]
    config = load_config(LLAMA2, ['calibration.sources=[{"source": "a.txt", "weight": 1}]'])
    assert config.calibration.describe() == "a.txt 1"


def test_uniform_and_multiples_parse_and_refuse_protected_layers(tmp_path: Path):
    raw = minimal()
    raw["pruning"].update({"uniform": True, "multiple_of": 64, "heads_multiple_of": 2})
    prn = load_config(write(tmp_path, raw)).pruning
    assert (prn.uniform, prn.multiple_of, prn.heads_multiple_of) == (True, 64, 2)
    raw["pruning"]["protected_layers"] = [0]
    assert "pruning.uniform" in user_error(write(tmp_path, raw))
    raw["pruning"].update({"uniform": False, "multiple_of": 0})
    assert "multiple_of" in user_error(write(tmp_path, raw))


def _alias_bomb(levels: int) -> str:
    """A 1 KB config whose anchors, each ten references to the one before, stand for 10**levels values."""
    lines = [
        "model: {path: some/model}",
        "pruning: {ratio: 0.2}",
        "a0: &a0 [" + ", ".join(["lol"] * 10) + "]",
    ]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_config_of_aliases_that_expands_to_billions_is_one_line_at_once(tmp_path: Path):
    import time

    start = time.perf_counter()
    message = user_error(write(tmp_path, _alias_bomb(10)))
    assert "expands to 123,456,790,126 values" in message and "YAML anchors and aliases" in message
    assert time.perf_counter() - start < 10  # unbounded, it ran past 1 GB in 20 s and never finished


def test_aliases_within_the_bound_are_validated_as_usual(tmp_path: Path):
    # 10**4 values expanded: legal YAML, so the schema decides (here: the unknown keys)
    assert "Additional properties are not allowed" in user_error(write(tmp_path, _alias_bomb(3)))


def test_a_schema_message_never_quotes_a_value_whole(tmp_path: Path):
    raw = {**minimal(), "name": "x" * 50_000 + " not allowed"}
    message = user_error(write(tmp_path, raw))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}: name: ") and "characters)" in message
    assert len(message) < MAX_MESSAGE_CHARS + 200


def test_expanded_size_counts_shared_parts_as_copies():
    leaf = [1, 2, 3]
    assert expanded_size({"a": leaf, "b": [leaf, leaf]}) == 1 + 4 + (1 + 4 + 4)
    assert expanded_size(7) == 1


def test_fisher_samples_beyond_the_windows_and_refit_settings_without_a_refit_are_refused(tmp_path: Path):
    raw = yaml.safe_load(SMOLLM2.read_text(encoding="utf-8"))
    raw["calibration"]["fisher_samples"] = 129
    with pytest.raises(UserError, match=r"fisher_samples is more than calibration.num_samples \(128\)"):
        load_config(write(tmp_path, raw))
    raw["calibration"]["fisher_samples"] = 128
    assert load_config(write(tmp_path, raw)).calibration.fisher_samples == 128
    raw["compensation"] = {"method": "none", "inputs": "dense"}
    with pytest.raises(UserError, match=r"compensation.inputs: dense is a setting of the refit pass"):
        load_config(write(tmp_path, raw))
    raw["pruning"]["importance"] = "activation"  # another criterion: the default's setting stays, unused
    raw["compensation"] = {"method": "refit"}
    assert load_config(write(tmp_path, raw)).calibration.fisher_samples == 128
