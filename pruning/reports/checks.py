"""What a report's numbers must satisfy beyond its schema: the sums docs/analysis.md promises.

A schema checks types and names; it cannot say that a total is the sum of its parts, that
``reduced = original - pruned``, or that a ratio lies in [0, 1]. These checks do, and name the first
JSON path that breaks one, so a hand-edited or corrupted report is caught by ``reports.load`` and
``--validate`` as surely as a misspelt field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pruning.families.base import REPORT_ATTENTION_FIELDS, REPORT_MLP_FIELDS
from pruning.storage.fs import relative_path_problem

Failure = tuple[str, str]  # (JSON path, what is wrong)
_RATIO_TOLERANCE = 1e-9


def first_failure(report: dict[str, Any]) -> Failure | None:
    """The first broken invariant of a schema-valid report, or None."""
    check = _CHECKS.get(report.get("report_type", ""))
    return next(check(report), None) if check else None


def _equal(path: str, actual: Any, expected: Any, rule: str) -> Iterator[Failure]:
    if actual != expected:
        yield path, f"{actual!r} breaks {rule} (expected {expected!r})"


def _ratio(path: str, removed: int, before: int, ratio: float | None) -> Iterator[Failure]:
    """``ratio = removed / before`` (None when before is 0), and in [0, 1]."""
    if before == 0:
        yield from _equal(path, ratio, None, "ratio = null when there was nothing")
        return
    expected = removed / before
    if ratio is None or abs(ratio - expected) > _RATIO_TOLERANCE:
        yield path, f"{ratio!r} breaks ratio = reduced / original (expected {expected!r})"
    elif not 0.0 <= ratio <= 1.0:
        yield path, f"{ratio!r} is outside [0, 1]: the pruned model cannot be larger than the original"


# -- model_analysis ----------------------------------------------------------------------------------


def _analysis(r: dict[str, Any]) -> Iterator[Failure]:
    layers, summary = r["layers"], r["layer_summary"]
    for i, layer in enumerate(layers):
        at = f"$.layers[{i}]"
        attn, mlp = layer["attention"], layer["mlp"]
        yield from _equal(f"{at}.layer_idx", layer["layer_idx"], i, "layer_idx = position in layers")
        parts = attn["total"] + mlp["total"] + layer["norm"] + layer["other"]
        yield from _equal(f"{at}.total", layer["total"], parts, "total = attention + mlp + norm + other")
        projections = sum(attn[p] for p in REPORT_ATTENTION_FIELDS)
        if attn["total"] < projections:
            yield f"{at}.attention.total", f"{attn['total']} is less than its projections ({projections})"
        projections = sum(mlp[p] for p in REPORT_MLP_FIELDS)
        if mlp["total"] < projections:
            yield f"{at}.mlp.total", f"{mlp['total']} is less than its projections ({projections})"
        yield from _equal(
            f"{at}.is_zero_layer", layer["is_zero_layer"], layer["total"] == 0, "zero = no params"
        )
    yield from _equal("$.layer_summary.num_layers", summary["num_layers"], len(layers), "= len(layers)")
    layer_sum = sum(layer["total"] for layer in layers)
    yield from _equal(
        "$.layer_summary.total_layer_params",
        summary["total_layer_params"],
        layer_sum,
        "= sum of layer totals",
    )
    lm_head = 0 if r["tied_embeddings"] else r["lm_head_params"]
    parts = r["embedding_params"] + lm_head + r["final_norm_params"] + summary["total_layer_params"]
    yield from _equal(
        "$.total_params",
        r["total_params"],
        parts + r["other_params"],
        "total = embedding + untied lm_head + final norm + layers + other",
    )


# -- model_comparison --------------------------------------------------------------------------------


def _delta(path: str, d: dict[str, Any]) -> Iterator[Failure]:
    yield from _equal(
        f"{path}.reduced", d["reduced"], d["original"] - d["pruned"], "reduced = original - pruned"
    )
    yield from _ratio(f"{path}.reduction_ratio", d["reduced"], d["original"], d["reduction_ratio"])


def _comparison(r: dict[str, Any]) -> Iterator[Failure]:
    layers = r["layers"]
    yield from _delta("$.total_params", r["total_params"])
    yield from _delta("$.layer_params", r["layer_params"])
    for i, layer in enumerate(layers):
        at = f"$.layers[{i}]"
        yield from _equal(f"{at}.layer_idx", layer["layer_idx"], i, "layer_idx = position in layers")
        for block in ("total", "attention", "mlp"):
            yield from _delta(f"{at}.{block}", layer[block])
        zero = layer["total"]["pruned"] == 0
        yield from _equal(f"{at}.is_zero_layer", layer["is_zero_layer"], zero, "zero = no params left")
    for side in ("original", "pruned"):
        layer_sum = sum(layer["total"][side] for layer in layers)
        yield from _equal(
            f"$.layer_params.{side}", r["layer_params"][side], layer_sum, "= sum of layer totals"
        )
        if r["total_params"][side] < r["layer_params"][side]:
            yield f"$.total_params.{side}", "is less than the layers it contains"
    zero_layers = [layer["layer_idx"] for layer in layers if layer["is_zero_layer"]]
    yield from _equal("$.zero_layers", r["zero_layers"], zero_layers, "= the layers with is_zero_layer")


# -- pruning_plan ------------------------------------------------------------------------------------


def _plan(r: dict[str, Any]) -> Iterator[Failure]:
    extra, layers = r["extra"], r["layers"]
    for i, layer in enumerate(layers):
        at = f"$.layers[{i}]"
        yield from _equal(f"{at}.layer_idx", layer["layer_idx"], i, "layer_idx = position in layers")
        for key, size in (("remove_kv_groups", "num_kv_groups"), ("remove_channels", "num_channels")):
            outside = [j for j in layer[key] if j >= layer[size]]
            if outside:
                yield f"{at}.{key}", f"indices {outside[:3]} are not below {size} = {layer[size]}"
    for key, field in (("removed_kv_groups", "remove_kv_groups"), ("removed_channels", "remove_channels")):
        yield from _equal(
            f"$.extra.{key}", extra[key], sum(len(x[field]) for x in layers), f"= sum of {field}"
        )
    for key, field, size in (
        ("attention_blocks_removed", "remove_kv_groups", "num_kv_groups"),
        ("mlp_blocks_removed", "remove_channels", "num_channels"),
    ):
        emptied = [x["layer_idx"] for x in layers if x[size] and len(x[field]) == x[size]]
        yield from _equal(f"$.extra.{key}", extra[key], emptied, "= the layers that lose every structure")
    planned = r["params_before"] - extra["params_removed"]
    yield from _equal("$.params_planned", r["params_planned"], planned, "= params_before - params_removed")


# -- run_record --------------------------------------------------------------------------------------


def _run_record(r: dict[str, Any]) -> Iterator[Failure]:
    removed = r["params_before"] - r["params_after"]
    yield from _equal("$.params_removed", r["params_removed"], removed, "= params_before - params_after")
    yield from _ratio("$.achieved_ratio", r["params_removed"], r["params_before"], r["achieved_ratio"])
    layer_removed = r["layer_params_before"] - r["layer_params_after"]
    yield from _ratio(
        "$.achieved_layer_ratio", layer_removed, r["layer_params_before"], r["achieved_layer_ratio"]
    )
    for name in r["files"]:  # the manifest decides what a later overwrite deletes: inside the run only
        problem = relative_path_problem(name)
        if problem is not None:
            yield f"$.files[{_shown(name)}]", problem


def _shown(name: str) -> str:
    """A manifest name as an error may quote it: escaped, and at most 80 characters."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


_CHECKS: dict[str, Callable[[dict[str, Any]], Iterator[Failure]]] = {
    "model_analysis": _analysis,
    "model_comparison": _comparison,
    "pruning_plan": _plan,
    "run_record": _run_record,
}
