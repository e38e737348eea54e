"""The built-in ``perplexity`` hook: dense and pruned perplexity on held-out text, with the protocol.

A perplexity means nothing without its protocol, so the report carries it whole (text, tokenizer,
window length, stride, token count, dtype) and two runs can be compared field by field. Windows are
consecutive and non-overlapping (stride = window length, no context carried across), as papers report.
A model the run streams (``pruning.source.streaming``) is evaluated one decoder layer at a time, with the
same logits a whole-model forward gives.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from pruning import reports
from pruning.hooks.base import Hook
from pruning.hooks.context import PipelineContext

logger = logging.getLogger(__name__)

# Named protocols: the two that papers use (WikiText-2 test, whole set), and this project's quick one.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper-2048": {"seq_len": 2048, "max_tokens": None},  # LLM-Pruner, FLAP, SliceGPT, Wanda tables
    "paper-128": {"seq_len": 128, "max_tokens": None},  # LLM-Pruner's short-context row
    "quick": {
        "seq_len": 512,
        "max_tokens": 8192,
    },  # first 8,192 tokens, 512-token windows (docs/running.md)
    "quick-32k": {"seq_len": 512, "max_tokens": 32768},  # the first 32,768 (benchmarks/quality.py)
}
DEFAULT_TEXT = "data/wikitext-2-raw/wiki.test.raw"


class PerplexityHook(Hook):
    """Perplexity of the dense model at ``before_prune`` and of the pruned one at ``after_prune``.

    Params: ``text`` (a file, or a ``datasets`` name ``path[:config[:split]]``; default WikiText-2
    test), ``protocol`` (``quick``, ``paper-2048``, ``paper-128``) or ``seq_len`` and ``max_tokens``
    (null: the whole text), ``batch_size``. Writes ``evaluation/perplexity.json``.
    """

    subdir = "evaluation"

    def __init__(
        self,
        text: str = DEFAULT_TEXT,
        protocol: str | None = "quick",
        seq_len: int | None = None,
        max_tokens: int | None = None,
        batch_size: int = 1,
    ) -> None:
        from pruning.calibration.data import looks_like_path

        if looks_like_path(text) and not Path(text).expanduser().exists():  # a folder: a datasets name
            raise ValueError(f"text file not found: {text}")  # said before any weight is read
        if protocol is not None and protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)} or null, got {protocol!r}")
        chosen = dict(PROTOCOLS[protocol]) if protocol else {"seq_len": None, "max_tokens": None}
        window = seq_len if seq_len is not None else chosen["seq_len"]
        limit = max_tokens if max_tokens is not None else chosen["max_tokens"]
        if not _integer_at_least(window, 2):
            raise ValueError(f"seq_len must be an integer >= 2 (or give a protocol), got {window!r}")
        if limit is not None and not _integer_at_least(limit, window):
            raise ValueError(f"max_tokens must be an integer >= seq_len ({window}) or null, got {limit!r}")
        if not _integer_at_least(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        _check_text(text, window)
        chosen = {"seq_len": window, "max_tokens": limit}
        self.text, self.protocol, self.batch_size = text, protocol, batch_size
        self.seq_len, self.max_tokens = chosen["seq_len"], chosen["max_tokens"]
        self.windows = None
        self.dense: dict[str, float] | None = None

    def before_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Tokenise the text once and measure the dense model."""
        from pruning.calibration.perplexity import evaluation_windows

        positions = getattr(context.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and self.seq_len > positions:
            logger.warning(
                "perplexity: windows of %d tokens are longer than the %d positions the model has "
                "(max_position_embeddings); its figures measure positions it was never trained on",
                self.seq_len,
                positions,
            )
        self.windows = evaluation_windows(self.text, context.tokenizer, self.seq_len, self.max_tokens)
        self.dense = self._measure(context)

    def after_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Measure the pruned model; write the report (validated first) and log the table."""
        if self.dense is None:
            raise RuntimeError("after_prune fired without before_prune")
        pruned = self._measure(context)
        report = self.report(context, pruned)
        out = context.output_dir / self.subdir / "perplexity.json"
        reports.save(report, out)
        protocol = report["protocol"]
        logger.info(
            "\nPerplexity (%s, %d windows x %d tokens, %s)\n  dense  %s\n  pruned %s\n  ratio  %s",
            protocol["text"],
            protocol["windows"],
            protocol["seq_len"],
            protocol["dtype"],
            _shown(report["dense"]["perplexity"]),
            _shown(report["pruned"]["perplexity"]),
            _shown(report["ratio"], "x"),
        )
        logger.info("  wrote %s", (context.published_dir or context.output_dir) / self.subdir / out.name)

    def _measure(self, context: PipelineContext) -> dict[str, float]:
        from pruning.calibration.perplexity import perplexity

        streamed = any(p.is_meta for p in context.model.parameters())
        start = time.perf_counter()
        value = perplexity(
            context.model,
            self.windows,
            self.batch_size,
            engine="layerwise" if streamed else "whole_model",
            store=context.layer_store,
        )
        seconds = round(time.perf_counter() - start, 3)
        return {"perplexity": value if math.isfinite(value) else None, "seconds": seconds}

    def report(self, context: PipelineContext, pruned: dict[str, float]) -> dict[str, Any]:
        windows = self.windows
        dense = self.dense or {}
        tokenizer = context.tokenizer
        return {
            "report_type": "perplexity",
            "schema_version": 1,
            "protocol": {
                "name": self.protocol,
                "text": self.text,
                "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
                "seq_len": self.seq_len,
                "stride": self.seq_len,
                "max_tokens": self.max_tokens,
                "windows": int(windows.shape[0]),
                "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
                "dtype": context.config.model.dtype,
                "batch_size": self.batch_size,
            },
            "dense": dense,
            "pruned": pruned,
            "ratio": _ratio(pruned["perplexity"], dense.get("perplexity")),
        }


def _check_text(text: str, seq_len: int) -> None:
    """A local or built-in text that cannot give one window fails now, before any weight is read; the
    exact token count needs the tokenizer, and is checked when the text is tokenised."""
    from pruning.calibration.data import is_text_file_path, source_text, text_problem
    from pruning.calibration.texts import is_builtin
    from pruning.errors import UserError

    if not (is_builtin(text) or is_text_file_path(text)):
        return  # a datasets name
    try:
        problem = text_problem(source_text(text, "evaluation"), seq_len)
    except UserError as e:
        raise ValueError(str(e)) from e
    if problem is not None:
        raise ValueError(f"text {text} {problem}")


def _ratio(pruned: float | None, dense: float | None) -> float | None:
    return None if pruned is None or dense is None else pruned / dense


def _shown(value: float | None, unit: str = "") -> str:
    return "overflow (not finite)" if value is None else f"{value:10.3f}{unit}"


def _integer_at_least(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
