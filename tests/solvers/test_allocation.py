"""Allocation inside a layer (rows) and across layers (uniform, global)."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers import LossCurve, allocate_global, allocate_uniform
from cap_dist.solvers.patterns import allocate_rows


def test_allocate_rows_takes_prefixes_and_the_exact_total() -> None:
    steps = torch.tensor([[0.1, 0.05, 0.3, 0.9], [0.2, 0.2, 0.2, 0.2], [1.0, 2.0, 3.0, 4.0]])
    counts = allocate_rows(steps, 5)
    assert int(counts.sum()) == 5
    # monotone increments: row0 -> 0.1,0.1,0.3,0.9 ; row1 -> 0.2 x4 ; row2 -> 1..4
    assert counts.tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="cannot remove"):
        allocate_rows(steps, 13)


@pytest.mark.parametrize("rows, depth", [(7, 5), (2048, 80)])
def test_allocation_by_selection_equals_the_stable_sort(rows: int, depth: int) -> None:
    """Without a precomputed order the removals are selected, not sorted: the counts must be those of the
    stable sort's prefix, ties included (integer losses tie often), also where the sampled band is used."""
    from cap_dist.solvers.patterns import removal_order

    g = torch.Generator().manual_seed(rows)
    steps = torch.randint(0, 40, (rows, depth), generator=g).float()
    steps[:, :2] = -torch.inf                                           # forced removals rank first
    for total in (1, 2 * rows, rows * depth // 2, rows * depth - 3):
        assert torch.equal(allocate_rows(steps, total), allocate_rows(steps, total, removal_order(steps)))


def _curve(scale: float, numel: int) -> LossCurve:
    s = torch.linspace(0, 0.95, 96, dtype=torch.float64)
    return LossCurve(s, scale * s ** 2, energy=1.0, numel=numel)


def test_global_allocation_hits_target_and_favours_cheap_layers() -> None:
    curves = {"cheap": _curve(1.0, 1000), "costly": _curve(10.0, 1000), "big": _curve(3.0, 3000)}  # same loss per weight as "cheap"
    levels = allocate_global(curves, 0.6)
    removed = sum(levels[n] * c.numel for n, c in curves.items())
    assert removed == pytest.approx(0.6 * 5000, rel=1e-6)
    assert levels["cheap"] > levels["costly"]
    assert levels["big"] == pytest.approx(levels["cheap"], abs=0.02)  # equal marginal cost


def test_global_allocation_normalises_by_layer_energy() -> None:
    loud = LossCurve(torch.linspace(0, 0.95, 96, dtype=torch.float64),
                     100.0 * torch.linspace(0, 0.95, 96, dtype=torch.float64) ** 2, energy=100.0, numel=1000)
    quiet = _curve(1.0, 1000)
    levels = allocate_global({"loud": loud, "quiet": quiet}, 0.5)
    assert levels["loud"] == pytest.approx(levels["quiet"], abs=0.02)
    raw = allocate_global({"loud": loud, "quiet": quiet}, 0.5, normalize=False)
    assert raw["quiet"] > raw["loud"]


def test_global_allocation_that_cannot_reach_the_target() -> None:
    with pytest.raises(ValueError, match="cannot be reached"):
        allocate_global({"a": _curve(1.0, 100)}, 0.97)
    assert allocate_uniform(["a", "b"], 0.5) == {"a": 0.5, "b": 0.5}
