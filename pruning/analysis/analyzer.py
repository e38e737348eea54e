"""ModelAnalyzer: parameter counts of a causal LM, per decoder layer, from whatever input is cheapest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pruning import reports
from pruning.analysis.inventory import Inventory, numel, split_layer_name
from pruning.analysis.sources import load_inventory
from pruning.analysis.text_report import format_analysis
from pruning.families import ATTENTION, GENERIC_FAMILY, MLP
from pruning.families.base import REPORT_ATTENTION_FIELDS, REPORT_MLP_FIELDS, FamilyAdapter

SCHEMA_VERSION = 1


class ModelAnalyzer:
    """Counts parameters of a model or checkpoint without loading weights it does not need.

    ``model_or_path`` is a live ``PreTrainedModel``, a model directory (safetensors headers, or
    ``config.json`` alone built on the meta device), a hub id, a ``.gguf`` file, or, with
    ``trust_pickle=True``, a pickled whole-model file.
    """

    def __init__(self, model_or_path: Any, model_name: str | None = None, trust_pickle: bool = False) -> None:
        self.model_or_path = model_or_path
        self.model_name = model_name or _default_name(model_or_path)
        self.trust_pickle = trust_pickle
        self.result: dict[str, Any] | None = None

    def analyze(self) -> dict[str, Any]:
        """Build (once) and return the analysis report; it is valid against model_analysis.schema.json."""
        if self.result is None:
            inventory = load_inventory(self.model_or_path, trust_pickle=self.trust_pickle)
            self.result = analyze_inventory(inventory, self.model_name)
        return self.result

    def format_report(self, verbose: bool = False, lang: str = "en") -> str:
        return format_analysis(self.analyze(), verbose=verbose, lang=lang)

    def print_report(self, verbose: bool = False, lang: str = "en") -> None:
        """Write the text report to standard output (per-layer lines only when verbose)."""
        print(self.format_report(verbose=verbose, lang=lang))

    def save_report(self, path: str | os.PathLike[str]) -> Path:
        """Validate against the schema, then write atomically."""
        return reports.save(self.analyze(), path)


def _default_name(model_or_path: Any) -> str:
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        return path.name or str(model_or_path)
    config = getattr(model_or_path, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return Path(name).name if name else type(model_or_path).__name__


def analyze_inventory(inv: Inventory, model_name: str) -> dict[str, Any]:
    """Sort every parameter into exactly one bucket, so the buckets add up to the total."""
    per_layer: list[dict[str, tuple[int, ...]]] = [{} for _ in range(inv.num_layers)]
    family = inv.family or GENERIC_FAMILY
    parts = dict.fromkeys(("embedding", "lm_head", "final_norm", "other"), 0)
    lm_head_shape: tuple[int, ...] | None = None
    embed_shape: tuple[int, ...] | None = None
    for name, shape in inv.shapes.items():
        split = split_layer_name(name)
        if split is not None and split[0] < inv.num_layers:
            per_layer[split[0]][split[1]] = shape
            continue
        part = family.top_level_part(name)
        parts[part] += numel(shape)
        if part == "embedding":
            embed_shape = shape
        elif part == "lm_head":
            lm_head_shape = shape
    embedding, lm_head, final_norm, other = (
        parts[k] for k in ("embedding", "lm_head", "final_norm", "other")
    )
    if inv.tied_embeddings and lm_head_shape is None and embed_shape is not None:
        lm_head = numel(embed_shape)  # shown for reference, counted once (in embedding_params)
    layer_reports = [_layer_report(i, shapes, inv, family) for i, shapes in enumerate(per_layer)]
    total_layers = sum(layer["total"] for layer in layer_reports)
    total = embedding + (0 if inv.tied_embeddings else lm_head) + final_norm + total_layers + other
    return {
        "report_type": "model_analysis",
        "schema_version": SCHEMA_VERSION,
        "model_name": model_name,
        "model_type": inv.model_type,
        "source": inv.source,
        "dtype": inv.dtype,
        "hidden_size": inv.hidden_size,
        "head_dim": inv.head_dim,
        "total_params": total,
        "embedding_params": embedding,
        "lm_head_params": lm_head,
        "tied_embeddings": inv.tied_embeddings,
        "final_norm_params": final_norm,
        "other_params": other,
        "layer_summary": {"num_layers": inv.num_layers, "total_layer_params": total_layers},
        "layers": layer_reports,
    }


def _layer_report(
    idx: int, shapes: dict[str, tuple[int, ...]], inv: Inventory, family: FamilyAdapter
) -> dict[str, Any]:
    """One layer's counts: each parameter goes to its block (split over the projection fields by the
    family, fused weights included), to the layer's norms, or to ``other``."""
    geometry = family.geometry_from_shapes(shapes, inv.head_dim)
    blocks = {ATTENTION: dict.fromkeys(REPORT_ATTENTION_FIELDS, 0), MLP: dict.fromkeys(REPORT_MLP_FIELDS, 0)}
    totals = {ATTENTION: 0, MLP: 0}
    norm = other = 0
    for name, shape in shapes.items():
        count = numel(shape)
        kind = family.block_of(name)
        if kind is not None:
            totals[kind] += count
            for field, part in family.report_fields(name.rpartition(".")[0], count, geometry).items():
                blocks[kind][field] += part
        elif family.is_layer_norm(name):
            norm += count
        else:
            other += count
    total = totals[ATTENTION] + totals[MLP] + norm + other
    return {
        "layer_idx": idx,
        "total": total,
        "attention": {
            "type": inv.block_type(idx, ATTENTION, totals[ATTENTION] > 0),
            "total": totals[ATTENTION],
            **blocks[ATTENTION],
            "num_heads": geometry.num_heads,
            "num_kv_heads": geometry.num_kv_heads,
        },
        "mlp": {
            "type": inv.block_type(idx, MLP, totals[MLP] > 0),
            "total": totals[MLP],
            **blocks[MLP],
            "intermediate_size": geometry.intermediate_size,
        },
        "norm": norm,
        "other": other,
        "is_zero_layer": total == 0,
    }
