"""ModelAnalyzer: parameter counts of a causal LM, per decoder layer, from whatever input is cheapest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pruning import reports
from pruning.analysis.inventory import Inventory, numel, split_layer_name
from pruning.analysis.sources import load_inventory
from pruning.analysis.text_report import format_analysis

SCHEMA_VERSION = 1
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
    layers = [_empty_layer() for _ in range(inv.num_layers)]
    embedding = lm_head = final_norm = other = 0
    lm_head_shape: tuple[int, ...] | None = None
    embed_shape: tuple[int, ...] | None = None
    for name, shape in inv.shapes.items():
        count = numel(shape)
        split = split_layer_name(name)
        if split is not None and split[0] < inv.num_layers:
            _add_layer_param(layers[split[0]], split[1], shape, count, inv.head_dim)
        elif name.endswith("embed_tokens.weight"):
            embedding += count
            embed_shape = shape
        elif name.startswith("lm_head."):
            lm_head += count
            lm_head_shape = shape
        elif "norm" in name.rsplit(".", 2)[-2]:
            final_norm += count
        else:
            other += count
    if inv.tied_embeddings and lm_head_shape is None and embed_shape is not None:
        lm_head = numel(embed_shape)  # shown for reference, counted once (in embedding_params)
    layer_reports = [_finish_layer(i, raw, inv) for i, raw in enumerate(layers)]
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


def _empty_layer() -> dict[str, Any]:
    return {
        "attention": dict.fromkeys(ATTENTION_PROJECTIONS, 0) | {"total": 0, "q_rows": 0, "k_rows": 0},
        "mlp": dict.fromkeys(MLP_PROJECTIONS, 0) | {"total": 0, "gate_rows": 0},
        "norm": 0,
        "other": 0,
    }


def _add_layer_param(
    raw: dict[str, Any], rest: str, shape: tuple[int, ...], count: int, head_dim: int
) -> None:
    """Attribute one parameter inside a decoder layer (``rest`` is e.g. ``self_attn.q_proj.weight``)."""
    block, _, tail = rest.partition(".")
    sub = tail.split(".", 1)[0]
    if block == "self_attn":
        attn = raw["attention"]
        attn["total"] += count
        if sub in ATTENTION_PROJECTIONS:
            attn[sub] += count
            if tail.endswith("weight") and sub in ("q_proj", "k_proj"):
                attn[f"{sub[0]}_rows"] = shape[0]
    elif block == "mlp":
        mlp = raw["mlp"]
        mlp["total"] += count
        if sub in MLP_PROJECTIONS:
            mlp[sub] += count
            if sub == "gate_proj" and tail.endswith("weight"):
                mlp["gate_rows"] = shape[0]
    elif "norm" in block:
        raw["norm"] += count
    else:
        raw["other"] += count


def _finish_layer(idx: int, raw: dict[str, Any], inv: Inventory) -> dict[str, Any]:
    attn, mlp = raw["attention"], raw["mlp"]
    total = attn["total"] + mlp["total"] + raw["norm"] + raw["other"]
    return {
        "layer_idx": idx,
        "total": total,
        "attention": {
            "type": inv.block_type(idx, "attention", attn["total"] > 0),
            "total": attn["total"],
            **{p: attn[p] for p in ATTENTION_PROJECTIONS},
            "num_heads": attn["q_rows"] // inv.head_dim,
            "num_kv_heads": attn["k_rows"] // inv.head_dim,
        },
        "mlp": {
            "type": inv.block_type(idx, "mlp", mlp["total"] > 0),
            "total": mlp["total"],
            **{p: mlp[p] for p in MLP_PROJECTIONS},
            "intermediate_size": mlp["gate_rows"],
        },
        "norm": raw["norm"],
        "other": raw["other"],
        "is_zero_layer": total == 0,
    }
