"""Perplexity on non-overlapping windows: the protocol papers report (stride = window length).

A number means nothing without its protocol; callers report the text file, tokenizer, window length,
token count and dtype along with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pruning.calibration.data import source_text, tokenize
from pruning.calibration.engine import batches, input_device
from pruning.calibration.layer_head import layerwise_logits
from pruning.errors import UserError

logger = logging.getLogger(__name__)


def evaluation_windows(
    text_path: str, tokenizer: Any, seq_len: int, max_tokens: int | None = None
) -> torch.LongTensor:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens from the start of the file.

    ``max_tokens`` caps the tokens used (e.g. the first 8,192); a trailing partial window is dropped.
    """
    if seq_len < 1:
        raise UserError(f"evaluation seq_len must be >= 1 (got {seq_len})")
    ids = tokenize(tokenizer, source_text(text_path, "evaluation"))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise UserError(
            f"evaluation file {text_path} gives {ids.numel()} tokens, fewer than seq_len {seq_len}"
        )
    return ids[: num_windows * seq_len].view(num_windows, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int = 1,
    engine: str = "whole_model",
    store: Any = None,
) -> float:
    """exp(mean next-token NLL over all predicted tokens of all windows).

    Each window predicts its tokens 1..seq_len-1 from the ones before; windows are independent (no
    context carried across), so every window contributes the same number of tokens. ``engine``
    ``layerwise`` computes the same logits one decoder layer at a time (``pruning.calibration.engine``;
    ``store``
    streams the layers of a model larger than memory).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows [n >= 1, seq_len >= 2], got {tuple(windows.shape)}")
    if engine == "layerwise":
        outputs = layerwise_logits(model, windows, batch_size, store)
    else:
        outputs = _whole_model_logits(model, batches(windows, batch_size))
    total_nll, total_tokens = 0.0, 0
    for batch, logits in tqdm(
        outputs, desc="perplexity", unit="batch", total=-(-windows.shape[0] // batch_size)
    ):
        logits = logits[:, :-1, :].float()
        targets = batch[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    ppl = math.exp(total_nll / total_tokens)
    logger.info("perplexity %.4f over %d windows x %d tokens", ppl, windows.shape[0], windows.shape[1])
    return ppl


def _whole_model_logits(
    model: nn.Module, parts: list[torch.LongTensor]
) -> Iterator[tuple[torch.LongTensor, torch.Tensor]]:
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        for batch in parts:
            yield batch, model(input_ids=batch.to(device), use_cache=False).logits
    finally:
        model.train(was_training)
