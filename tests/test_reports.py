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
