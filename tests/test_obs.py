"""Greedy OBS removal (``pruning.compensation.obs``) against brute-force least squares."""

from __future__ import annotations

import pytest
import torch

from pruning.compensation.obs import _exact_state, _remove, greedy_removal
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


def _left_after_refit(
    x: torch.Tensor, weight: torch.Tensor, removed_cols: list[int], damp: float = 0.0
) -> float:
    """Output error per token once ``removed_cols`` are gone and the rest are refit by least squares.
    ``damp`` appends the rows ``sqrt(tokens * damp) I`` to the inputs, so that the Gram matrix per token
    is ``x^T x / tokens + damp I``: the damped problem OBS solves."""
    tokens = len(x)
    if damp:
        x = torch.cat([x, (tokens * damp) ** 0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    keep = [c for c in range(x.shape[1]) if c not in removed_cols]
    target = x @ weight.T
    if not keep:
        return float(target.pow(2).sum() / tokens)
    refit = torch.linalg.lstsq(x[:, keep], target).solution
    return float((x[:, keep] @ refit - target).pow(2).sum() / tokens)


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


def test_a_limit_caps_the_last_chunk() -> None:
    """Ten structures in three steps go four at a time; a limit of five takes one chunk of four and then
    only one more, and the five left are charged twice the last charge, plus one."""
    x, weight, blocks = _problem(seed=4, count=10, width=2)
    order, charge = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-6, limit=5, steps=3)
    assert len(order) == 5 and len(set(order)) == 5
    rest = [s for s in range(10) if s not in order]
    top = float(charge[order].max())
    assert charge[rest].tolist() == pytest.approx([2 * top + 1] * 5, rel=1e-6)


@pytest.mark.parametrize(
    ("count", "steps", "chunks"), [(10, 3, [4, 4, 2]), (11, 4, [3, 3, 3, 2]), (7, 9, [1] * 7)]
)
def test_a_block_takes_at_most_steps_updates(
    monkeypatch: pytest.MonkeyPatch, count: int, steps: int, chunks: list[int]
) -> None:
    """A chunk is ceil(count / steps) structures, so a block costs at most ``steps`` updates of H^-1
    whatever its width; ``count // steps`` would take one more update for the remainder."""
    from pruning.compensation import obs

    sizes: list[int] = []

    def counted(w: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> float:
        sizes.append(len(cols) // 2)
        return _remove(w, h_inv, cols)

    monkeypatch.setattr(obs, "_remove", counted)
    x, weight, blocks = _problem(seed=5, count=count, width=2)
    order, _ = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-6, steps=steps)
    assert sizes == chunks and len(sizes) <= steps and sorted(order) == list(range(count))


def test_the_periodic_refresh_recomputes_the_state_of_the_kept_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No other test runs past the first refresh (every ``REFRESH`` steps). With a refresh every third
    step, each refresh starts from the weights refit onto exactly the columns still kept, so the greedy
    stays the brute-force one and each charge is what its removal adds after a least-squares refit."""
    from pruning.compensation import obs

    monkeypatch.setattr(obs, "REFRESH", 3)
    kept_at_refresh: list[list[int]] = []
    real_exact_state = obs._exact_state

    def spied(weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor):
        kept_at_refresh.append(kept.tolist())
        return real_exact_state(weight, h, kept)

    monkeypatch.setattr(obs, "_exact_state", spied)
    x, weight, blocks = _problem(seed=9, count=8, width=1)
    order, charge = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-12, steps=8)
    assert kept_at_refresh == [sorted(set(range(8)) - set(order[:step])) for step in (0, 3, 6)]
    gone: list[int] = []
    left = _left_after_refit(x, weight, gone)
    level = 0.0
    for picked in order:
        errors = {s: _left_after_refit(x, weight, [*gone, s]) for s in range(8) if s not in gone}
        assert picked == min(errors, key=errors.get)
        level = max(level, errors[picked] - left)
        assert float(charge[picked]) == pytest.approx(level, rel=1e-4)
        gone.append(picked)
        left = errors[picked]


def test_a_chunk_shares_the_error_it_adds_in_proportion_to_the_single_errors() -> None:
    """Seven structures in three steps go three, three and one at a time, on the damped Gram matrix
    (``ridge`` a share of its mean diagonal, here far from one). Brute force, each chunk is the cheapest
    single removals given those already gone; the error the chunk adds after a least-squares refit is
    shared among them in proportion to their single errors, and the charges are the running maximum."""
    x, weight, blocks = _problem(seed=12, count=7, width=2)
    x = 3 * x
    gram = x.T @ x / len(x)
    ridge = 0.05
    damp = ridge * float(gram.diagonal().mean())
    order, charge = greedy_removal(weight, gram, blocks, ridge=ridge, steps=3)

    def left(structures: list[int]) -> float:
        return _left_after_refit(x, weight, blocks[structures].flatten().tolist(), damp)

    gone: list[int] = []
    level = 0.0
    for size in (3, 3, 1):
        base = left(gone)
        single = {s: left([*gone, s]) - base for s in range(7) if s not in gone}
        chunk = sorted(single, key=single.get)[:size]
        assert order[len(gone) : len(gone) + size] == chunk
        joint = left([*gone, *chunk]) - base
        for s in chunk:
            level = max(level, single[s] * joint / sum(single[t] for t in chunk))
            assert float(charge[s]) == pytest.approx(level, rel=1e-4)
        gone += chunk


def test_one_non_finite_removal_error_is_refused_before_anything_is_removed() -> None:
    """Every structure's error is checked, not only whether any is finite: a float64 weight column of
    1e200 (inputs uncorrelated, so it stays in its column) overflows one structure's removal error, and
    the call fails at once even though a limit of two would only take cheaper structures."""
    gen = torch.Generator().manual_seed(13)
    gram = torch.diag(torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    weight[:, 4] = 1e200
    with pytest.raises(UserError, match="non-finite removal errors after 0 of 5"):
        greedy_removal(weight, gram, torch.arange(5)[:, None], ridge=1e-6, limit=2)


def test_by_default_a_block_takes_128_steps_and_a_fresh_state_every_32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented defaults: a chunk is ceil(count / 128) structures, so 129 go two at a time (64 chunks
    of two, then one), and every ``REFRESH`` = 32 steps the state is recomputed from scratch: at steps 0,
    32 and 64, with 129, 65 and 1 structures kept."""
    from pruning.compensation import obs

    sizes: list[int] = []
    kept_at_refresh: list[int] = []

    def counted(w: torch.Tensor, h_inv: torch.Tensor, cols: torch.Tensor) -> float:
        sizes.append(len(cols))
        return _remove(w, h_inv, cols)

    def spied(weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor):
        kept_at_refresh.append(len(kept))
        return _exact_state(weight, h, kept)

    monkeypatch.setattr(obs, "_remove", counted)
    monkeypatch.setattr(obs, "_exact_state", spied)
    x, weight, blocks = _problem(seed=10, count=129, width=1)
    order, _ = greedy_removal(weight, x.T @ x / len(x), blocks, ridge=1e-6)
    assert sizes == [2] * 64 + [1]
    assert kept_at_refresh == [129, 65, 1]
    assert sorted(order) == list(range(129))


def test_removals_leave_the_exact_state_of_the_kept_columns() -> None:
    """``_remove``'s in-place downdates track what ``_exact_state`` computes afresh for the columns still
    kept: the refit weights, and ``H^-1`` of the kept columns, with the removed rows and columns zero and
    their diagonal one, so a periodic refresh only undoes rounding (and drops those rows and columns)."""
    x, weight, _ = _problem(seed=14, count=7, width=1)
    h = x.T @ x / len(x)
    w, h_inv = _exact_state(weight, h, torch.arange(7))
    gone: list[int] = []
    for step in ([5], [0, 2]):
        _remove(w, h_inv, torch.tensor(step))
        gone += step
        kept = torch.tensor([c for c in range(7) if c not in gone])
        exact_w, exact_h_inv = _exact_state(weight, h, kept)
        assert exact_w.shape == (4, len(kept)) and exact_h_inv.shape == (len(kept), len(kept))
        torch.testing.assert_close(w[:, kept], exact_w, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(h_inv[kept[:, None], kept[None, :]], exact_h_inv, rtol=1e-6, atol=1e-9)
        assert torch.all(w[:, gone] == 0) and torch.all(h_inv[gone][:, kept] == 0)
        assert torch.all(h_inv[gone, gone] == 1)


def test_a_nearly_dead_input_is_damped_by_the_floor() -> None:
    """The damp is ``ridge`` x the mean diagonal, but never below 1e-12, so that a dead or nearly dead
    input stays solvable. Inputs of scale 1e-7 (a mean diagonal near 1e-12) sit right at that floor:
    each charge is then the brute-force refit error of the problem damped by exactly 1e-12."""
    x, weight, blocks = _problem(seed=5, count=4, width=1)
    x = x * (1e-6 / x.std())  # second moments near 1e-12: ridge x mean is far below the floor
    gram = x.T @ x / len(x)
    assert 1e-3 * float(gram.diagonal().mean()) < 1e-13
    order, charge = greedy_removal(weight, gram, blocks, ridge=1e-3, steps=4)
    gone: list[int] = []
    left_before, level = _left_after_refit(x, weight, [], damp=1e-12), 0.0
    for picked in order[:3]:
        gone.append(picked)
        left = _left_after_refit(x, weight, gone, damp=1e-12)
        level = max(level, left - left_before)  # charges never decrease along the order
        assert float(charge[picked]) == pytest.approx(level, rel=1e-4)
        left_before = left
