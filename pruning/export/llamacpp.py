"""A GGUF file run by llama.cpp itself (through llama-cpp-python), for checking an export against
transformers: logits of token windows, greedy next tokens, perplexity on the package's protocol.

llama-cpp-python is optional (``pip install 'pruning[llamacpp]'`` builds llama.cpp from source;
docs/serving.md). Token ids go in directly, so these checks compare the networks, not the
tokenizers; the tokenizer written into the GGUF is compared separately (``tokenize``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pruning.errors import UserError


def available() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


GGML_TYPE_F32 = 0  # llama.cpp's KV cache is f16 by default; checks keep it f32 so only the weights differ


class LlamaCppModel:
    """One GGUF loaded on the CPU with every position's logits kept (what perplexity needs)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_ctx: int = 512,
        threads: int | None = None,
        *,
        f32_cache: bool = True,
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise UserError(
                "llama-cpp-python is not installed: pip install 'pruning[llamacpp]' (builds llama.cpp)"
            ) from e
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist")
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads or os.cpu_count() or 1,
            logits_all=True,
            type_k=GGML_TYPE_F32 if f32_cache else None,
            type_v=GGML_TYPE_F32 if f32_cache else None,
            verbose=False,
        )

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """[len(tokens), vocab] float32 logits of one sequence, from an empty context."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def next_token(self, tokens: Sequence[int]) -> int:
        return int(self.logits(tokens)[-1].argmax())

    def tokenize(self, text: str) -> list[int]:
        """The GGUF's own tokenizer, without a BOS token and without parsing special tokens."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def perplexity(self, windows: np.ndarray) -> float:
        """exp(mean next-token NLL) over windows [n, seq_len], as
        ``pruning.calibration.perplexity.perplexity``."""
        total, count = 0.0, 0
        for window in windows:
            logits = self.logits(window.tolist())[:-1].astype(np.float64)
            targets = np.asarray(window[1:])
            top = logits.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        return math.exp(total / count)

    def close(self) -> None:
        self.llm.close()
