"""Allocation of removed groups: the Lagrangian choice against exhaustive search on small curves."""

from __future__ import annotations

import itertools

import pytest
import torch

from cap_dist.structured.allocate import BudgetError, lagrangian_counts, uniform_counts


def _exhaustive(curves: dict[str, torch.Tensor], costs: dict[str, float], budget: float) -> float:
    best = float("inf")
    names = list(curves)
    for ks in itertools.product(*[range(len(curves[n])) for n in names]):
        if sum(costs[n] * k for n, k in zip(names, ks)) >= budget:
            best = min(best, sum(float(curves[n][k]) for n, k in zip(names, ks)))
    return best


def test_lagrangian_reaches_the_budget_at_the_exhaustive_optimum_on_convex_curves() -> None:
    g = torch.Generator().manual_seed(0)
    curves = {f"m{i}": torch.cat([torch.zeros(1), torch.rand(5, generator=g).sort().values.cumsum(0)])
              for i in range(3)}
    costs = {"m0": 1.0, "m1": 2.0, "m2": 3.0}
    for budget in (2.0, 6.0, 11.0):
        counts = lagrangian_counts(curves, costs, budget)
        saved = sum(costs[n] * k for n, k in counts.items())
        assert saved >= budget
        loss = sum(float(curves[n][k]) for n, k in counts.items())
        if saved == budget:                          # on the hull's vertices the Lagrangian choice is optimal
            assert loss == pytest.approx(_exhaustive(curves, costs, budget))


def test_cheap_loss_per_saved_unit_is_taken_first() -> None:
    curves = {"cheap": torch.tensor([0.0, 0.1, 0.2, 0.3]), "dear": torch.tensor([0.0, 5.0, 10.0, 15.0])}
    assert lagrangian_counts(curves, {"cheap": 1.0, "dear": 1.0}, 3.0) == {"cheap": 3, "dear": 0}
    assert lagrangian_counts(curves, {"cheap": 1.0, "dear": 1.0}, 0.0) == {"cheap": 0, "dear": 0}


def test_uniform_removes_one_fraction_everywhere() -> None:
    valid = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(19, dtype=torch.bool)}
    assert uniform_counts({"a": 10, "b": 20}, valid, {"a": 1.0, "b": 1.0}, 15.0) == {"a": 5, "b": 10}
    valid["b"][1::2] = False                                 # b may only lose an even number of groups
    counts = uniform_counts({"a": 10, "b": 20}, valid, {"a": 1.0, "b": 1.0}, 16.0)
    assert counts["b"] % 2 == 0 and sum(counts.values()) >= 16


def test_invalid_counts_are_never_chosen() -> None:
    curves = {"a": torch.tensor([0.0, 0.1, torch.inf, 0.3, torch.inf]), "b": torch.tensor([0.0, 1.0, 2.0])}
    for budget in range(1, 6):
        counts = lagrangian_counts(curves, {"a": 1.0, "b": 1.0}, float(budget))
        assert counts["a"] in (0, 1, 3) and sum(counts.values()) >= budget


def test_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(BudgetError, match="max_fraction"):
        lagrangian_counts({"a": torch.zeros(3)}, {"a": 1.0}, 5.0)
