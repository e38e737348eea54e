"""The human-readable reports, in English or in the original specification's Chinese labels."""

from __future__ import annotations

from typing import Any

RULE = "=" * 60
THIN_RULE = "-" * 60

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "comparison_title": "Detailed comparison report",
        "analysis_title": "Model analysis",
        "total_params": "Total parameters",
        "layer_params": "Decoder layer parameters",
        "original": "Original",
        "pruned": "Pruned",
        "reduced": "Reduced",
        "per_layer": "Per-layer details",
        "layer": "Layer",
        "layer_total": "Total",
        "heads": "Heads",
        "intermediate": "Intermediate size",
        "fully_pruned": "fully pruned",
        "zero_layers": "Fully pruned layers ({n}): {ids}",
        "no_zero_layers": "Fully pruned layers: none",
        "model_type": "Model type",
        "dtype": "dtype",
        "embedding": "Embedding",
        "lm_head": "LM head",
        "tied": "tied to the embedding, counted once",
        "final_norm": "Final norm",
        "other": "Other",
        "num_layers": "Decoder layers",
        "norm": "Norm",
    },
    "zh": {
        "comparison_title": "详细对比报告",
        "analysis_title": "模型分析",
        "total_params": "总参数量",
        "layer_params": "Decoder Layers 参数",
        "original": "原始",
        "pruned": "剪枝后",
        "reduced": "减少",
        "per_layer": "每层剪枝详情",
        "layer": "Layer",
        "layer_total": "总参数",
        "heads": "头数",
        "intermediate": "中间维度",
        "fully_pruned": "完全剪空",
        "zero_layers": "完全剪空的层 ({n}个): {ids}",
        "no_zero_layers": "完全剪空的层: 无",
        "model_type": "模型类型",
        "dtype": "数据类型",
        "embedding": "Embedding",
        "lm_head": "LM Head",
        "tied": "与 Embedding 共享，只计一次",
        "final_norm": "最终 Norm",
        "other": "其他",
        "num_layers": "Decoder 层数",
        "norm": "Norm",
    },
}


def labels_for(lang: str) -> dict[str, str]:
    if lang not in LABELS:
        raise ValueError(f"unknown report language {lang!r}; choose one of {sorted(LABELS)}")
    return LABELS[lang]


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.2f}%"


def _change(d: dict[str, Any]) -> str:
    """``33,554,432 → 26,843,520 (-20.00%)``"""
    ratio = d["reduction_ratio"]
    pct = "n/a" if ratio is None else f"{-ratio * 100:.2f}%" if d["reduced"] else "0.00%"
    return f"{d['original']:,} → {d['pruned']:,} ({pct})"


def format_comparison(comparison: dict[str, Any], verbose: bool = False, lang: str = "en") -> str:
    """The specification's comparison log: totals, decoder layers, per-layer details, zero layers."""
    t = labels_for(lang)
    lines = [RULE, t["comparison_title"], RULE, ""]
    for key, label in (("total_params", t["total_params"]), ("layer_params", t["layer_params"])):
        d = comparison[key]
        lines += [
            f"{label}:",
            f"  {t['original']}: {d['original']:,}",
            f"  {t['pruned']}: {d['pruned']:,}",
            f"  {t['reduced']}: {d['reduced']:,} ({_pct(d['reduction_ratio'])})",
            "",
        ]
    if verbose:
        lines += [f"{t['per_layer']}:", THIN_RULE]
        for layer in comparison["layers"]:
            lines += ["", *_comparison_layer_lines(layer, t)]
        lines.append("")
    zero = comparison["zero_layers"]
    lines.append(t["zero_layers"].format(n=len(zero), ids=zero) if zero else t["no_zero_layers"])
    lines += ["", RULE]
    return "\n".join(lines)


def _comparison_layer_lines(layer: dict[str, Any], t: dict[str, str]) -> list[str]:
    attn, mlp = layer["attention"], layer["mlp"]
    marker = f" [{t['fully_pruned']}]" if layer["is_zero_layer"] else ""
    heads_o = f"{attn['num_heads']['original']}Q:{attn['num_kv_heads']['original']}KV"
    heads_p = f"{attn['num_heads']['pruned']}Q:{attn['num_kv_heads']['pruned']}KV"
    inter = mlp["intermediate_size"]
    return [
        f"{t['layer']} {layer['layer_idx']:2d}{marker}:",
        f"  {t['layer_total']}: {_change(layer['total'])}",
        f"  Attention: {_change(attn)}",
        f"    {t['heads']}: {heads_o} → {heads_p}",
        f"  MLP: {_change(mlp)}",
        f"    {t['intermediate']}: {inter['original']} → {inter['pruned']}",
    ]


def format_analysis(analysis: dict[str, Any], verbose: bool = False, lang: str = "en") -> str:
    """One model's counts; per-layer lines only when verbose."""
    t = labels_for(lang)
    lm_head = f"{analysis['lm_head_params']:,}"
    if analysis["tied_embeddings"]:
        lm_head += f" ({t['tied']})"
    summary = analysis["layer_summary"]
    lines = [
        RULE,
        f"{t['analysis_title']}: {analysis['model_name']}",
        RULE,
        "",
        f"{t['model_type']}: {analysis['model_type']}    {t['dtype']}: {analysis['dtype']}",
        f"{t['total_params']}: {analysis['total_params']:,}",
        f"  {t['embedding']}: {analysis['embedding_params']:,}",
        f"  {t['lm_head']}: {lm_head}",
        f"  {t['final_norm']}: {analysis['final_norm_params']:,}",
        f"  {t['other']}: {analysis['other_params']:,}",
        f"{t['num_layers']}: {summary['num_layers']}",
        f"{t['layer_params']}: {summary['total_layer_params']:,}",
    ]
    if verbose:
        lines += ["", THIN_RULE]
        for layer in analysis["layers"]:
            attn, mlp = layer["attention"], layer["mlp"]
            marker = f" [{t['fully_pruned']}]" if layer["is_zero_layer"] else ""
            lines.append(
                f"{t['layer']} {layer['layer_idx']:2d}{marker}: {layer['total']:,}  "
                f"Attention {attn['total']:,} ({attn['num_heads']}Q:{attn['num_kv_heads']}KV)  "
                f"MLP {mlp['total']:,} ({t['intermediate']} {mlp['intermediate_size']})  "
                f"{t['norm']} {layer['norm']:,}"
            )
    lines += ["", RULE]
    return "\n".join(lines)
