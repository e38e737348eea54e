"""The rows of the quality table: the reference methods, this project's variants, and what a row runs with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # issue 20's levers for a faster default, each on top of the previous one
    (
        "ours: 90/5/5; obs_steps 32; fisher 16",
        {**_OBS_FISHER, **_mix(0.9, 0.05), "compensation.obs_steps": 32, "calibration.fisher_samples": 16},
    ),
    (
        "ours: 90/5/5; obs_steps 32; fisher 16; 64x256",
        {
            **_OBS_FISHER,
            **_mix(0.9, 0.05),
            "compensation.obs_steps": 32,
            "calibration.fisher_samples": 16,
            "calibration.num_samples": 64,
        },
    ),
    (
        "ours: 90/5/5; obs_steps 32; fisher 16; dense inputs",
        {
            **_OBS_FISHER,
            **_mix(0.9, 0.05),
            "compensation.obs_steps": 32,
            "calibration.fisher_samples": 16,
            "compensation.inputs": "dense",
        },
    ),
    (
        "ours: 90/5/5; obs_steps 32; fisher 32; 128x128",
        {
            **_OBS_FISHER,
            **_mix(0.9, 0.05),
            "compensation.obs_steps": 32,
            "calibration.fisher_samples": 32,
            "calibration.seq_len": 128,
        },
    ),
    # kept counts in multiples (issue 20: the speed they buy against their quality cost)
    *[
        (
            f"ours: 90/5/5; obs_steps 32; fisher 16; multiple_of {multiple}",
            {
                **_OBS_FISHER,
                **_mix(0.9, 0.05),
                "compensation.obs_steps": 32,
                "calibration.fisher_samples": 16,
                "pruning.multiple_of": multiple,
            },
        )
        for multiple in (1, 16, 32, 64, 128)
    ],
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


def method_key(name: str) -> str:
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
    keep_dir: str | None = None  # this project's rows copy their checkpoint here (--keep-checkpoints)
