"""One row of the quality table, in a fresh process: prune, check the count, measure perplexity."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quality_methods import (
    CONFIG,
    DENSE,
    EVAL_SEQ_LEN,
    NOT_PRUNING,
    EvalText,
    RowSpec,
    method_key,
)

logger = logging.getLogger("quality")


def _vmhwm_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``, not ``ru_maxrss``: see memory.py)."""
    from pruning.pipeline.run_record import peak_rss_mb

    return peak_rss_mb()


def _load(spec: RowSpec) -> tuple[Any, Any]:
    """The model (SmolLM2-135M by default) in float32 on the row's device, loaded as the pipeline loads
    a model that fits one device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.source.builtin import resolve

    path = resolve(spec.model)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        use_safetensors=True,
        device_map=spec.device if spec.device != "cpu" else None,
    )
    return model.to(spec.device).eval(), AutoTokenizer.from_pretrained(path)


def _evaluate(model: Any, tokenizer: Any, spec: RowSpec) -> dict[str, dict[str, Any]]:
    """Perplexity on every text; a failure is recorded for that text, not raised."""
    from pruning.calibration.perplexity import evaluation_windows, perplexity

    out = {}
    for text in spec.texts:
        try:
            windows = evaluation_windows(text.source, tokenizer, EVAL_SEQ_LEN, text.max_tokens)
            ppl = perplexity(model, windows, spec.eval_batch_size)
            out[text.name] = {"ppl": ppl, "tokens": int(windows.numel())}
        except Exception as exc:  # noqa: BLE001 - one text's failure must not lose the row
            out[text.name] = {"ppl": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        logger.info("%s: %s", text.name, out[text.name])
    return out


def _facts(model: Any) -> dict[str, Any]:
    """The dense model's shape, for the report's protocol."""
    config = model.config
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _gpu_peak_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


SHARE_SLACK = (0.001, 0.005)  # below the target (added biases), above it (one structure, or one per layer)


def _check_share(row: dict[str, Any], ratio: float) -> None:
    """The removed share must be the target give or take a sliver: recorded in the row, never fatal."""
    before, after = row["params_before"], row["params_after"]
    share = (before - after) / before
    row["removed_share"] = share
    ok = ratio - SHARE_SLACK[0] <= share <= ratio + SHARE_SLACK[1]
    row["params_check"] = "ok" if ok else f"off target: {share:.4f} removed for {ratio}"


def run_reference(spec: RowSpec) -> dict[str, Any]:
    """Load, cut calibration windows, prune with a reference method (or not, for dense), evaluate."""
    import torch

    from pruning.calibration.data import calibration_windows

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import references  # noqa: PLC0415 - benchmarks/ is not a package

    start = time.perf_counter()
    model, tokenizer = _load(spec)
    load_s = time.perf_counter() - start
    before = references.count_params(model)
    row: dict[str, Any] = {"load_s": round(load_s, 2), "params_before": before}
    if spec.method == DENSE:
        row.update(params_after=before, removed_share=0.0, prune_s=0.0, notes={}, model=_facts(model))
    else:
        if spec.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        windows = calibration_windows(
            spec.calib_source, tokenizer, spec.calib_samples, spec.calib_len, spec.seed
        ).to(spec.device)
        notes = references.METHODS[spec.method](model, windows, spec.ratio, spec.batch_size)
        if spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        row["prune_s"] = round(time.perf_counter() - start, 2)
        row["notes"] = notes
        row["params_after"] = references.count_params(model)
        if "failed" in notes:
            row["removed_share"] = None
            row["params_check"] = "pruning failed"
        elif spec.method == "torch_pruning":  # its width ratio is searched; the share is what it is
            row["removed_share"] = (before - row["params_after"]) / before
            row["params_check"] = "reported"
        else:
            _check_share(row, spec.ratio)
    row["peak_rss_mb"] = round(_vmhwm_mb(), 1)
    row["peak_gpu_mb"] = _gpu_peak_mb(spec.device)
    failed = "failed" in row.get("notes", {})
    row["eval"] = {} if failed else _evaluate(model, tokenizer, spec)
    return row


def _override(key: str, value: Any) -> str:
    """``--set`` syntax: strings as written, anything else as JSON (which YAML reads)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def run_ours(spec: RowSpec) -> dict[str, Any]:
    """The real pipeline, hooks off, into a temporary directory; then its checkpoint reloaded and
    evaluated. Time and memory are the pipeline's own (run.json: its VmHWM when it finished)."""
    import torch

    from pruning.checkpoint.load import load_pruned_model
    from pruning.config import load_config
    from pruning.pipeline.run import run_pipeline

    with tempfile.TemporaryDirectory(prefix="quality-ours-") as tmp:
        out = Path(tmp) / "run"
        overrides = [
            _override("pruning.ratio", spec.ratio),
            _override("output.dir", str(out)),
            "hooks=[]",
            _override("model.path", spec.model),
            _override("model.dtype", "float32"),
            _override("calibration.source", spec.calib_source),  # a variant's own sources replace it
            _override("calibration.num_samples", spec.calib_samples),
            _override("calibration.seq_len", spec.calib_len),
            _override("calibration.seed", spec.seed),
            _override("calibration.batch_size", spec.batch_size),
        ]
        if spec.device != "cpu":
            overrides.append(_override("model.device_map", spec.device))
        sized = ("calibration.num_samples", "calibration.seq_len")
        variant = {k: v for k, v in spec.overrides.items() if not (spec.quick and k in sized)}
        overrides += [_override(k, _placed(v, spec)) for k, v in variant.items()]
        context = run_pipeline(load_config(CONFIG, overrides))
        checkpoint = Path(context.checkpoint_dir)
        del context
        record = json.loads((out / "run.json").read_text())
        plan = json.loads((out / "plan.json").read_text())
        timings = record["timings_s"]
        model = load_pruned_model(checkpoint, device=spec.device)
        after = sum(p.numel() for p in model.parameters())
        row: dict[str, Any] = {
            "load_s": timings.get("load"),
            "prune_s": round(sum(v for k, v in timings.items() if k not in NOT_PRUNING), 2),
            "params_before": record["params_before"],
            "params_after": after,
            "peak_rss_mb": record["peak_rss_mb"],
            "peak_gpu_mb": record.get("peak_gpu_mb"),
            "notes": {
                "overrides": overrides[len(overrides) - len(variant) :],
                "timings_s": timings,
                "removed_kv_groups": plan["extra"].get("removed_kv_groups"),
                "removed_channels": plan["extra"].get("removed_channels"),
                "attention_blocks_removed": plan["extra"].get("attention_blocks_removed"),
                "mlp_blocks_removed": plan["extra"].get("mlp_blocks_removed"),
            },
        }
        _check_share(row, spec.ratio)
        if after != record["params_after"]:
            row["params_check"] += f"; reloaded {after:,} != run.json {record['params_after']:,}"
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
        row["eval"] = _evaluate(model.eval(), _tokenizer(spec.model), spec)
        if spec.keep_dir:  # for benchmarks/speed.py: the checkpoint outlives the row
            kept = Path(spec.keep_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', spec.method)}-{spec.ratio:g}"
            shutil.copytree(checkpoint, kept)  # a new name in a folder that was empty: replaces nothing
            row["notes"]["checkpoint"] = str(kept)
    return row


def _placed(value: Any, spec: RowSpec) -> Any:
    """``WIKI_VALID`` -> the calibration file; ``builtin:NAME`` -> ``texts_dir/NAME.txt`` when given."""
    if isinstance(value, list):
        return [_placed(v, spec) for v in value]
    if isinstance(value, dict):
        return {k: _placed(v, spec) for k, v in value.items()}
    if value == "WIKI_VALID":
        return spec.calib_source
    return text_file(value, spec.texts_dir) if isinstance(value, str) else value


def text_file(source: str, texts_dir: str | None) -> str:
    if texts_dir and source.startswith("builtin:"):
        return str(Path(texts_dir) / (source.removeprefix("builtin:") + ".txt"))
    return source


def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from pruning.source.builtin import resolve

    return AutoTokenizer.from_pretrained(resolve(name))


def child_main(spec_json: str, row_out: str) -> int:
    """One row in this (fresh) process; the row goes to ``row_out`` as JSON."""
    import torch

    data = json.loads(spec_json)
    data["texts"] = [EvalText(**t) for t in data["texts"]]
    spec = RowSpec(**data)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    row = run_ours(spec) if method_key(spec.method).startswith("ours") else run_reference(spec)
    row.update(method=spec.method, ratio=0.0 if spec.method == DENSE else spec.ratio)
    Path(row_out).write_text(json.dumps(row, default=str))
    return 0
