"""The built-in ``gguf`` hook: the saved checkpoint as a GGUF file for llama.cpp (pruning.export.gguf)."""

from __future__ import annotations

import json
import logging
from typing import Any

from pruning.errors import UserError
from pruning.hooks.base import Hook
from pruning.hooks.context import PipelineContext

logger = logging.getLogger(__name__)


class GgufHook(Hook):
    """Writes ``<output dir>/gguf/<name>-<dtype>.gguf`` after the checkpoint is saved.

    Params: ``dtype`` (``f16``, ``bf16``, ``f32`` or ``q8_0``) and ``filename`` (default from the run's
    name and the dtype). The file is written inside the run's staging directory, so it appears with
    the rest of the run, or not at all.
    """

    subdir = "gguf"

    def __init__(self, dtype: str = "f16", filename: str | None = None) -> None:
        from pruning.export.gguf import QTYPES

        if dtype not in QTYPES:
            raise ValueError(f"dtype must be one of {sorted(QTYPES)}, got {dtype!r}")
        if filename is not None and (
            not filename.endswith(".gguf") or "/" in filename or filename.startswith(".")
        ):
            raise ValueError(f"filename must be a plain name ending in .gguf, got {filename!r}")
        self.dtype, self.filename = dtype, filename

    def before_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Refuse a model the export cannot write now, not after hours of scoring."""
        from pruning.export.gguf import check_exportable, check_tokenizer

        config = context.model.config.to_dict()
        check_exportable(config, context.model_path or "the model")
        backend = getattr(context.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UserError("hooks: gguf needs a fast tokenizer (tokenizer.json) to write into the GGUF")
        # the checks the export makes on the saved tokenizer.json, now rather than after the pruning
        check_tokenizer(config, json.loads(backend.to_str()), "the model's tokenizer")

    def after_save(self, context: PipelineContext, **kwargs: Any) -> None:
        """Export the checkpoint just saved."""
        from pruning.export.gguf import export_gguf

        if context.checkpoint_dir is None:
            raise RuntimeError("after_save fired without a checkpoint")
        name = self.filename or f"{context.config.name}-{self.dtype}.gguf"
        export_gguf(context.checkpoint_dir, context.output_dir / self.subdir / name, dtype=self.dtype)
        published = context.published_dir or context.output_dir
        logger.info("  wrote %s", published / self.subdir / name)
