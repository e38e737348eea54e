"""Schemas: valid reports pass, corrupted ones fail with the failing JSON path, nothing invalid is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pruning import reports
from pruning.analysis import ModelAnalyzer, ModelComparator
from tests.conftest import config_dir


@pytest.fixture(scope="module")
def analysis() -> dict:
    return ModelAnalyzer(config_dir("llama-3-8b"), "llama3").analyze()


@pytest.fixture(scope="module")
def comparison(analysis: dict) -> dict:
    return ModelComparator(analysis, analysis).compare()


def test_schemas_are_valid_draft_2020_12():
    import jsonschema

    for name in reports.SCHEMA_FILES.values():
        schema = reports.load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda r: r["layers"][3].__setitem__("total", "many"), "$.layers[3].total"),
        (lambda r: r["layers"][1]["attention"].pop("num_kv_heads"), "$.layers[1].attention"),
        (lambda r: r.__setitem__("total_params", -1), "$.total_params"),
        (lambda r: r.__setitem__("surprise", 1), "$"),
        (lambda r: r["layer_summary"].__setitem__("num_layers", 1.5), "$.layer_summary.num_layers"),
    ],
)
def test_corrupted_analysis_names_the_path(analysis: dict, mutate, path: str, tmp_path: Path):
    bad = copy.deepcopy(analysis)
    mutate(bad)
    with pytest.raises(reports.ReportValidationError) as info:
        reports.validate(bad)
    assert info.value.json_path == path
    target = tmp_path / "bad.json"
    with pytest.raises(reports.ReportValidationError):
        reports.save(bad, target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, not even a temporary file


def test_corrupted_comparison_names_the_path(comparison: dict):
    bad = copy.deepcopy(comparison)
    bad["layers"][2]["mlp"]["intermediate_size"]["pruned"] = None
    with pytest.raises(
        reports.ReportValidationError, match=r"\$\.layers\[2\]\.mlp\.intermediate_size\.pruned"
    ):
        reports.validate(bad)
    bad = copy.deepcopy(comparison)
    bad["total_params"]["reduction_ratio"] = "20%"
    with pytest.raises(reports.ReportValidationError, match=r"\$\.total_params\.reduction_ratio"):
        reports.validate(bad)


def test_save_then_load_round_trip(analysis: dict, comparison: dict, tmp_path: Path):
    for report in (analysis, comparison):
        path = reports.save(report, tmp_path / f"{report['report_type']}.json")
        assert reports.load(path) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_analysis.json", "model_comparison.json"]


def test_load_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(reports.ReportValidationError, match="broken.json.*not valid JSON"):
        reports.load(path)
    path.write_text(json.dumps({"report_type": "weather"}))
    with pytest.raises(reports.ReportValidationError, match=r"broken.json: \$\.report_type"):
        reports.load(path)


# -- invariants beyond the schema ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda r: r.__setitem__("total_params", r["total_params"] + 1), "$.total_params"),
        (lambda r: r["layers"][2].__setitem__("norm", r["layers"][2]["norm"] + 1), "$.layers[2].total"),
        (lambda r: r["layers"][1].__setitem__("layer_idx", 7), "$.layers[1].layer_idx"),
        (lambda r: r["layer_summary"].__setitem__("num_layers", 31), "$.layer_summary.num_layers"),
        (lambda r: r["layers"][0].__setitem__("is_zero_layer", True), "$.layers[0].is_zero_layer"),
    ],
    ids=["total", "layer-total", "layer-idx", "num-layers", "zero-flag"],
)
def test_analysis_sums_are_checked(analysis: dict, mutate, path: str):
    bad = copy.deepcopy(analysis)
    mutate(bad)
    with pytest.raises(reports.ReportValidationError) as info:
        reports.validate(bad)
    assert info.value.json_path == path


def _shrink_layer_params(comparison: dict) -> None:
    """A self-consistent delta that no longer equals the sum of the layers."""
    delta = comparison["layer_params"]
    delta.update(
        pruned=1, reduced=delta["original"] - 1, reduction_ratio=(delta["original"] - 1) / delta["original"]
    )


def _pruned_comparison(analysis: dict) -> dict:
    pruned = copy.deepcopy(analysis)
    layer = pruned["layers"][0]
    layer["mlp"]["total"] -= 3 * 4096
    layer["mlp"]["gate_proj"] -= 4096
    layer["mlp"]["up_proj"] -= 4096
    layer["mlp"]["down_proj"] -= 4096
    layer["mlp"]["intermediate_size"] -= 1
    layer["total"] -= 3 * 4096
    pruned["layer_summary"]["total_layer_params"] -= 3 * 4096
    pruned["total_params"] -= 3 * 4096
    reports.validate(pruned)
    return ModelComparator(analysis, pruned).compare()


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda c: c["total_params"].__setitem__("reduced", 1), "$.total_params.reduced"),
        (lambda c: c["total_params"].__setitem__("reduction_ratio", 0.5), "$.total_params.reduction_ratio"),
        (lambda c: c["layers"][0]["mlp"].__setitem__("pruned", 10**12), "$.layers[0].mlp.reduced"),
        (lambda c: c.__setitem__("zero_layers", [3]), "$.zero_layers"),
        (_shrink_layer_params, "$.layer_params.pruned"),
        (lambda c: c["total_params"].__setitem__("surprise", 1), "$.total_params"),
        (lambda c: c["layer_params"].__setitem__("surprise", 1), "$.layer_params"),
    ],
    ids=["reduced", "ratio", "layer-reduced", "zero-layers", "layer-sum", "unknown-total", "unknown-layer"],
)  # fmt: skip
def test_comparison_sums_and_fields_are_checked(analysis: dict, mutate, path: str):
    good = _pruned_comparison(analysis)
    reports.validate(good)
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(reports.ReportValidationError) as info:
        reports.validate(bad)
    assert info.value.json_path == path


def test_a_pruned_model_larger_than_the_original_is_refused(analysis: dict):
    smaller = _pruned_comparison(analysis)
    reversed_ = ModelComparator(
        ModelAnalyzer(config_dir("llama-3-8b")).analyze()
        | {"total_params": smaller["total_params"]["pruned"]},
        analysis,
    )
    with pytest.raises(reports.ReportValidationError, match=r"outside \[0, 1\]"):
        reports.validate(reversed_.compare())


def test_plan_and_run_record_schemas(tmp_path: Path):
    from pruning.planning.plan import LayerPlan, PruningPlan

    plan = PruningPlan(
        layers=(LayerPlan(0, 2, 8, (1,), (0, 3)), LayerPlan(1, 2, 8, (0, 1), ())),
        criterion="manual",
        params_before=1000,
        params_target=800,
        params_planned=790,
        extra={"ratio": 0.2, "ratio_of": "total", "params_removed": 210, "removed_kv_groups": 3,
               "removed_channels": 2, "attention_blocks_removed": [1], "mlp_blocks_removed": []},
    ).to_dict()  # fmt: skip
    reports.validate(plan)
    for mutate, path in [
        (lambda p: p["layers"][1].__setitem__("remove_kv_groups", [0, 5]), "$.layers[1].remove_kv_groups"),
        (lambda p: p["extra"].__setitem__("removed_channels", 9), "$.extra.removed_channels"),
        (
            lambda p: p["extra"].__setitem__("attention_blocks_removed", []),
            "$.extra.attention_blocks_removed",
        ),
        (lambda p: p.__setitem__("params_planned", 1), "$.params_planned"),
    ]:
        bad = copy.deepcopy(plan)
        mutate(bad)
        with pytest.raises(reports.ReportValidationError) as info:
            reports.validate(bad)
        assert info.value.json_path == path
