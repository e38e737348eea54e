"""Greedy OBS removal (``pruning.compensation.obs``) against brute-force least squares."""

from __future__ import annotations

import pytest
import torch

from pruning.compensation.obs import _remove, greedy_removal
from pruning.errors import UserError


def _problem(seed: int, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs (so refits matter), a weight, and the structures' column blocks."""
    gen = torch.Generator().manual_seed(seed)
    cols = count * width
    x = torch.randn(600, cols, generator=gen, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=gen, dtype=torch.float64
    )
    weight = torch.randn(4, cols, generator=gen, dtype=torch.float64)
    return x, weight, torch.arange(cols).reshape(count, width)


def _left_after_refit(x: torch.Tensor, weight: torch.Tensor, removed_cols: list[int]) -> float:
    """Output error per token once ``removed_cols`` are gone and the rest are refit by least squares."""
    keep = [c for c in range(x.shape[1]) if c not in removed_cols]
    target = x @ weight.T
    if not keep:
        return float(target.pow(2).sum() / len(x))
    refit = torch.linalg.lstsq(x[:, keep], target).solution
    return float((x[:, keep] @ refit - target).pow(2).sum() / len(x))


@pytest.mark.parametrize("width", [1, 2])
def test_one_at_a_time_it_is_the_brute_force_greedy(width: int) -> None:
    """With one structure per step, each step removes the structure whose joint removal with those
    already gone leaves the least error after a full least-squares refit."""
    x, weight, blocks = _problem(seed=width, count=6, width=width)
    order, _ = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-12, steps=6)
    gone: list[int] = []
    for picked in order[:5]:
        errors = {
            s: _left_after_refit(x, weight, sum((blocks[t].tolist() for t in [*gone, s]), []))
            for s in range(6)
            if s not in gone
        }
        assert picked == min(errors, key=errors.get)
        gone.append(picked)
    assert sorted(order) == list(range(6))


def test_sequential_removals_add_up_to_one_joint_removal() -> None:
    """Each OBS step refits and downdates ``H^-1``, so the errors the steps add sum to what the union
    leaves after one least-squares refit: the charges measure sets, not structures alone."""
    x, weight, _ = _problem(seed=7, count=8, width=1)
    h = x.T @ x / len(x)
    h_inv = torch.linalg.inv(h)
    w = weight.clone()
    total, gone = 0.0, []
    for step in ([5], [0, 2], [7]):
        total += _remove(w, h_inv, torch.tensor(step))
        gone += step
        assert total == pytest.approx(_left_after_refit(x, weight, gone), rel=1e-6)
        assert torch.all(w[:, gone] == 0)


def test_charges_never_decrease_along_the_order() -> None:
    x, weight, blocks = _problem(seed=8, count=12, width=2)
    order, charge = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-6, steps=5)
    charges = charge[order]
    assert torch.all(charges[1:] >= charges[:-1]) and charges[0] > 0


def test_a_limit_stops_early_and_charges_the_rest_above_all() -> None:
    x, weight, blocks = _problem(seed=3, count=10, width=1)
    gram = x.T @ x / len(x)
    full, _ = greedy_removal(weight, gram, blocks, ridge=1e-6, steps=10)
    order, charge = greedy_removal(weight, gram, blocks, ridge=1e-6, limit=4, steps=10)
    assert order == full[:4]
    rest = [s for s in range(10) if s not in order]
    assert charge[rest].min() > charge[order].max()


def test_removing_in_steps_beats_ranking_single_removals() -> None:
    """Twenty of forty strongly correlated structures: greedy steps (one or four per step) leave less
    error than taking the twenty cheapest single removals at once, which ``refit_error`` amounts to."""
    x, weight, blocks = _problem(seed=11, count=40, width=1)
    gram = x.T @ x / len(x)
    left = {
        steps: _left_after_refit(x, weight, greedy_removal(weight, gram, blocks, 1e-6, 20, steps)[0])
        for steps in (40, 10, 1)
    }
    assert left[40] < left[10] < left[1]


def test_a_dead_input_is_removed_first_and_costs_nothing() -> None:
    x, weight, blocks = _problem(seed=2, count=5, width=1)
    x[:, 3] = 0
    order, charge = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=0.0, steps=5)
    assert order[0] == 3
    assert float(charge[3]) == pytest.approx(0.0, abs=1e-9)


def test_non_finite_statistics_are_one_clear_error() -> None:
    x, weight, blocks = _problem(seed=6, count=5, width=1)
    weight[2, 1] = float("nan")
    with pytest.raises(UserError, match="non-finite removal errors after 0 of 5"):
        greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-6)
