"""Allocation of removed groups: the Lagrangian choice against exhaustive search on small curves."""

from __future__ import annotations

import itertools

import pytest
import torch

from cap_dist.structured.allocate import BudgetError, lagrangian_counts, linear_savings
from cap_dist.structured.allocate import uniform_counts as _uniform_counts


def _lin(costs: dict[str, float], curves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return linear_savings(costs, {n: len(c) for n, c in curves.items()})


def lagrangian(curves: dict[str, torch.Tensor], costs: dict[str, float], budget: float) -> dict[str, int]:
    return lagrangian_counts(curves, _lin(costs, curves), budget)


def uniform_counts(groups, valid, costs, budget):
    return _uniform_counts(groups, valid, _lin(costs, valid), budget)


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
        counts = lagrangian(curves, costs, budget)
        saved = sum(costs[n] * k for n, k in counts.items())
        assert saved >= budget
        loss = sum(float(curves[n][k]) for n, k in counts.items())
        if saved == budget:                          # on the hull's vertices the Lagrangian choice is optimal
            assert loss == pytest.approx(_exhaustive(curves, costs, budget))


def test_cheap_loss_per_saved_unit_is_taken_first() -> None:
    curves = {"cheap": torch.tensor([0.0, 0.1, 0.2, 0.3]), "dear": torch.tensor([0.0, 5.0, 10.0, 15.0])}
    assert lagrangian(curves, {"cheap": 1.0, "dear": 1.0}, 3.0) == {"cheap": 3, "dear": 0}
    assert lagrangian(curves, {"cheap": 1.0, "dear": 1.0}, 0.0) == {"cheap": 0, "dear": 0}


def test_uniform_removes_one_fraction_everywhere() -> None:
    valid = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(19, dtype=torch.bool)}
    assert uniform_counts({"a": 10, "b": 20}, valid, {"a": 1.0, "b": 1.0}, 15.0) == {"a": 5, "b": 10}
    valid["b"][1::2] = False                                 # b may only lose an even number of groups
    counts = uniform_counts({"a": 10, "b": 20}, valid, {"a": 1.0, "b": 1.0}, 16.0)
    assert counts["b"] % 2 == 0 and sum(counts.values()) >= 16


def test_invalid_counts_are_never_chosen() -> None:
    curves = {"a": torch.tensor([0.0, 0.1, torch.inf, 0.3, torch.inf]), "b": torch.tensor([0.0, 1.0, 2.0])}
    for budget in range(1, 6):
        counts = lagrangian(curves, {"a": 1.0, "b": 1.0}, float(budget))
        assert counts["a"] in (0, 1, 3) and sum(counts.values()) >= budget


def test_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(BudgetError, match="max_fraction"):
        lagrangian({"a": torch.zeros(3)}, {"a": 1.0}, 5.0)


def test_a_whole_branch_saving_step_is_taken_when_only_it_reaches_the_budget() -> None:
    """Savings need not be linear: removing a structure whole saves a step more (its per-call overhead)."""
    curves = {"a": torch.tensor([0.0, 0.1, 0.2, 0.5]), "b": torch.tensor([0.0, 0.05, 0.1, 0.15])}
    savings = {"a": torch.tensor([0.0, 1.0, 2.0, 10.0]), "b": torch.tensor([0.0, 1.0, 2.0, 3.0])}
    assert lagrangian_counts(curves, savings, 4.0) == {"a": 1, "b": 3} or \
        sum(float(savings[n][k]) for n, k in lagrangian_counts(curves, savings, 4.0).items()) >= 4.0
    counts = lagrangian_counts(curves, savings, 10.0)
    assert counts["a"] == 3                                   # nothing else reaches 10
    assert counts["b"] == 0                                   # and the step alone already does
    with pytest.raises(ValueError, match="saving per count"):
        lagrangian_counts(curves, {"a": savings["a"][:3], "b": savings["b"]}, 1.0)
