"""Structured (group) OBS against brute force: least squares over every kept-column set, re-solved at each step."""

from __future__ import annotations

import itertools

import pytest
import torch

from cap_dist.solvers.structured import (contiguous_groups, damped_hessian, greedy_group_obs, group_loss,
                                         magnitude_group_scores, oneshot_group_scores, prune_groups,
                                         solve_kept_columns)
from tests.solvers.synthetic import correlated_problem

DAMP = 1e-3


def _ls_loss(w: torch.Tensor, h: torch.Tensor, removed_groups: list[int], groups: torch.Tensor) -> float:
    """Brute force: the least-squares optimum on the kept columns by lstsq on a square root of H, and its loss."""
    cols = groups[removed_groups].reshape(-1) if removed_groups else torch.empty(0, dtype=torch.long)
    keep = [c for c in range(w.shape[1]) if c not in set(cols.tolist())]
    x = torch.linalg.cholesky(h).T                          # H = xᵀx: rows of x are "samples"
    target = x @ w.T                                        # [n, out]
    sol = torch.linalg.lstsq(x[:, keep], target).solution  # [K, out]
    pruned = torch.zeros_like(w)
    pruned[:, keep] = sol.T
    return group_loss(w, pruned, h)


def _problem(groups: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w, _, h = correlated_problem(5, groups * size, 400, seed, rho=0.8)
    return w, h, damped_hessian(h, DAMP), contiguous_groups(groups, size)


@pytest.mark.parametrize("size", [1, 3])
def test_one_step_is_the_best_single_group_by_brute_force(size: int) -> None:
    w, h, hd, groups = _problem(6, size, seed=1)
    res = greedy_group_obs(w, h, groups, 1, damp=DAMP)
    brute = [_ls_loss(w, hd, [g], groups) for g in range(groups.shape[0])]
    assert int(res.order[0]) == min(range(len(brute)), key=brute.__getitem__)
    assert res.losses[0].item() == pytest.approx(min(brute), rel=1e-8)
    assert group_loss(w, res.weight, hd) == pytest.approx(min(brute), rel=1e-8)


@pytest.mark.parametrize("size", [1, 2])
def test_greedy_equals_brute_force_greedy_and_its_weights_the_least_squares_optimum(size: int) -> None:
    w, h, hd, groups = _problem(7, size, seed=2)
    count = 5
    res = greedy_group_obs(w, h, groups, count, damp=DAMP)
    removed: list[int] = []
    for step in range(count):                 # re-solve least squares for every candidate at every step
        candidates = [g for g in range(groups.shape[0]) if g not in removed]
        losses = {g: _ls_loss(w, hd, removed + [g], groups) for g in candidates}
        best = min(losses, key=losses.get)
        assert int(res.order[step]) == best
        before = _ls_loss(w, hd, removed, groups)
        assert res.losses[step].item() == pytest.approx(losses[best] - before, rel=1e-6, abs=1e-10)
        removed.append(best)
    optimum = solve_kept_columns(w, h, groups[removed].reshape(-1), damp=DAMP)
    torch.testing.assert_close(res.weight, optimum, rtol=1e-8, atol=1e-10)
    assert group_loss(w, res.weight, hd) == pytest.approx(res.losses.sum().item(), rel=1e-8)
    assert bool((res.weight[:, groups[removed].reshape(-1)] == 0).all())


def test_exhaustive_best_subset_is_never_beaten_and_greedy_is_close() -> None:
    w, h, hd, groups = _problem(6, 2, seed=3)
    count = 3
    best = min(_ls_loss(w, hd, list(c), groups) for c in itertools.combinations(range(6), count))
    res = greedy_group_obs(w, h, groups, count, damp=DAMP)
    greedy = group_loss(w, res.weight, hd)
    assert greedy >= best * (1 - 1e-9)        # the exhaustive optimum is a lower bound ...
    assert greedy <= 1.5 * best               # ... and the correlation-aware greedy lands near it here


def test_oneshot_scores_are_each_groups_own_removal_loss() -> None:
    w, h, hd, groups = _problem(5, 2, seed=4)
    scores = oneshot_group_scores(w, torch.linalg.inv(hd), groups)
    torch.testing.assert_close(scores, torch.tensor([_ls_loss(w, hd, [g], groups) for g in range(5)],
                                                    dtype=torch.float64), rtol=1e-8, atol=1e-12)


def test_baselines_choose_by_their_scores_and_share_the_least_squares_resolve() -> None:
    w, h, hd, groups = _problem(6, 2, seed=5)
    w[:, 4:6] *= 1e-3                             # group 2 is by far the smallest
    mag = prune_groups(w, h, groups, 2, "magnitude", damp=DAMP)
    assert int(mag.order[0]) == 2
    assert set(mag.order.tolist()) == set(torch.argsort(magnitude_group_scores(w, groups))[:2].tolist())
    obs = prune_groups(w, h, groups, 2, "obs", damp=DAMP)
    scores = oneshot_group_scores(w, torch.linalg.inv(hd), groups)
    assert set(obs.order.tolist()) == set(torch.argsort(scores)[:2].tolist())
    for res in (mag, obs):
        torch.testing.assert_close(res.weight, solve_kept_columns(w, h, groups[res.order].reshape(-1), damp=DAMP))
        assert res.kept.tolist() == sorted(set(range(6)) - set(res.order.tolist()))
    cap = prune_groups(w, h, groups, 2, "cap", damp=DAMP)
    assert group_loss(w, cap.weight, hd) <= min(group_loss(w, r.weight, hd) for r in (mag, obs)) * (1 + 1e-9)


def test_correlated_groups_greedy_beats_oneshot() -> None:
    """Two near-duplicate inputs: one-shot OBS sees each as free to remove (the other compensates) and removes
    both; the greedy rescores after the first and keeps the second."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-3 * torch.randn(500, generator=g, dtype=torch.float64)
    h = 2.0 / 500 * x.T @ x
    w = torch.tensor([[1.0, 1.0, 0.5, 0.5]] * 3, dtype=torch.float64)   # the pair's removal costs (1+1)² vs 0.5²
    groups = contiguous_groups(4, 1)
    hd = damped_hessian(h, DAMP)
    cap = prune_groups(w, h, groups, 2, "cap", damp=DAMP)
    obs = prune_groups(w, h, groups, 2, "obs", damp=DAMP)
    assert set(obs.order.tolist()) == {0, 1}
    assert set(cap.order.tolist()) != {0, 1}
    assert group_loss(w, cap.weight, hd) < 0.1 * group_loss(w, obs.weight, hd)


def test_bad_arguments_are_clear_errors() -> None:
    w, h, _, groups = _problem(4, 1, seed=6)
    with pytest.raises(ValueError, match="at least one group stays"):
        greedy_group_obs(w, h, groups, 4)
    with pytest.raises(ValueError, match="overlap"):
        greedy_group_obs(w, h, torch.tensor([[0, 1], [1, 2]]), 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        greedy_group_obs(w, h, torch.tensor([[0], [9]]), 1)
    with pytest.raises(ValueError, match="not one of"):
        prune_groups(w, h, groups, 1, "wanda")
