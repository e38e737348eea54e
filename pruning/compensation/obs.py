"""Greedy optimal-brain-surgeon removal along one output projection: the order in which its structures
go and what each removal costs once the refit has made up for it.

``refit_error`` scores each structure as if it alone left (``tr(W_S [H^-1]_SS^-1 W_S^T)``). When
structures are removed together, those whose inputs the same others could reproduce can no longer
cover for each other, so single-removal scores undercount. Here structures leave one chunk at a time;
after each chunk the weights take the optimal refit and ``H^-1`` loses those rows and columns (the
SparseGPT / ZipLM updates, by structure), and each structure is charged the error its removal added.
Charges are made non-decreasing along the order, so a global ranking that takes the cheapest first
removes a prefix of each block's order: exactly the sets whose costs were measured.

A chunk is ``ceil(count / steps)`` structures of a block (``steps`` 128: 12 MLP channels of SmolLM2,
86 of Llama-2-7B), so a block costs ``steps`` updates of ``H^-1`` whatever its width; within a chunk
the joint error is shared in proportion to the single-removal errors. Measured on SmolLM2-135M, one
structure per step and 12 per step gave the same plan but for a handful of channels and the same
perplexity to 0.2% (docs/compensation.md). Every ``REFRESH`` steps the refit weights and ``H^-1`` of the
kept columns are recomputed from scratch (one Cholesky inverse), so rounding cannot build up.
"""

from __future__ import annotations

import itertools
import math

import torch

from pruning.errors import UserError
from pruning.families import OwnedSlice

REFRESH = 32  # steps between exact recomputations of the refit weights and H^-1
STEPS = 128  # updates of H^-1 per block: compensation.obs_steps' default


def greedy_removal(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    blocks: torch.Tensor,
    ridge: float,
    limit: int | None = None,
    steps: int = STEPS,
) -> tuple[list[int], torch.Tensor]:
    """Remove structures (``blocks``: [structures, width] column indices of ``weight``) greedily, cheapest
    refit error first, until ``limit`` are gone (all by default).

    Returns the removal order and, per structure, its non-decreasing charge (float32, on the CPU);
    structures past ``limit`` are charged twice the last charge, plus one.
    """
    count, width = blocks.shape
    limit = count if limit is None else limit
    h = second_moment.double()
    damp = max(ridge * float(h.diagonal().mean()), 1e-12)  # a dead input (all-zero Gram) stays solvable
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    original = weight.detach().to(h.device, torch.float64)
    idx = blocks.to(h.device)
    local = torch.empty_like(idx)  # each kept structure's columns in the compact state
    alive = torch.ones(count, dtype=torch.bool, device=h.device)
    charge = torch.zeros(count, dtype=torch.float64)
    order: list[int] = []
    chunk = max(1, math.ceil(count / steps))
    level = 0.0
    for step in itertools.count():
        if len(order) >= limit:
            break
        alive_ids = torch.nonzero(alive).flatten()
        if step % REFRESH == 0:  # bound the drift of repeated downdates; shrink to the kept columns
            w, h_inv = _exact_state(original, h, idx[alive_ids].flatten())
            local[alive_ids] = torch.arange(len(alive_ids) * width, device=h.device).view(-1, width)
        cols = local[alive_ids]  # [alive, width]
        h_ss = h_inv[cols[:, :, None], cols[:, None, :]]
        w_s = w[:, cols].permute(1, 0, 2)  # [alive, out, width]
        single = block_errors(w_s, h_ss)
        if not torch.isfinite(single).all():
            raise UserError(
                f"greedy OBS: non-finite removal errors after {len(order)} of {count} removals "
                "(non-finite weights or calibration statistics?)"
            )
        pick = torch.argsort(single)[: min(chunk, limit - len(order))]
        chosen = alive_ids[pick]
        joint = _remove(w, h_inv, local[chosen].flatten())
        shares = single[pick] * (joint / max(float(single[pick].sum()), 1e-300))
        for structure, cost in zip(chosen.tolist(), shares.tolist(), strict=True):
            level = max(level, cost)
            charge[structure] = level
            order.append(structure)
        alive[chosen] = False
    charge[alive.cpu()] = 2 * level + 1.0
    return order, charge.float()


def column_blocks(owned: OwnedSlice, count: int) -> torch.Tensor:
    """[count, width]: the columns of ``owned``'s Linear that each of ``count`` structures owns."""
    return torch.tensor([owned.indices([s]) for s in range(count)], dtype=torch.long)


def block_errors(w_s: torch.Tensor, h_ss: torch.Tensor) -> torch.Tensor:
    """Per structure, ``tr(W_S A^-1 W_S^T)`` for ``w_s`` [structures, out, width] and the positive definite
    ``h_ss`` [structures, width, width]. By Cholesky, not ``torch.linalg.solve``: its batched LU on the CPU
    failed at random here ("Pivots given to lu_solve must all be greater or equal to 1") on finite,
    well-conditioned input."""
    if h_ss.shape[-1] == 1:
        return w_s.pow(2).sum(dim=(1, 2)) / h_ss[:, 0, 0]
    factor = torch.linalg.cholesky(h_ss)
    solved = torch.cholesky_solve(w_s.transpose(1, 2), factor)  # [structures, width, out]
    return (w_s * solved.transpose(1, 2)).sum(dim=(1, 2))


def _exact_state(
    weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights refit onto the ``kept`` columns ([out, kept]) and ``H^-1`` of the kept columns
    ([kept, kept]), computed afresh: what the downdates track. Only the kept columns are carried, so
    each refresh makes the state, and every step after it, cheaper as the block empties."""
    h_kk_inv = torch.cholesky_inverse(torch.linalg.cholesky(h[kept[:, None], kept[None, :]]))
    return weight @ h[:, kept] @ h_kk_inv, h_kk_inv


def _remove(w: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> float:
    """Drop ``cols`` in place: the optimal refit of the other columns and the downdated ``H^-1``;
    returns the output error the removal added."""
    h_ss_inv = torch.cholesky_inverse(torch.linalg.cholesky(h_inv[cols[:, None], cols[None, :]]))
    rows = h_inv[cols, :].clone()
    w_s = w[:, cols].clone()
    joint = float((w_s @ h_ss_inv * w_s).sum())
    w -= w_s @ h_ss_inv @ rows
    h_inv -= rows.T @ h_ss_inv @ rows
    w[:, cols] = 0
    h_inv[cols, :] = 0
    h_inv[:, cols] = 0
    h_inv[cols, cols] = 1.0  # keeps the removed block's solves finite; never picked again
    return joint
