"""Reconstruction quality on correlated inputs: CAP lowest, sparsegpt ≤ wanda ≤ magnitude; exact masks."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers import is_valid_n_m, parse_pattern, prune_layer

from tests.solvers.synthetic import correlated_problem

SEEDS = range(3)
CASES = [(0.5, "unstructured"), (0.75, "unstructured"), (0.9, "unstructured"), (0.5, "2:4")]


def mean_error(method: str, sparsity: float, pattern: str, block_size: int | None) -> float:
    errors = []
    for seed in SEEDS:
        w, x, h = correlated_problem(rows=48, cols=256, samples=1024, seed=seed, dtype=torch.float32)
        res = prune_layer(w, h, method=method, sparsity=sparsity, pattern=pattern, block_size=block_size)
        # the measured error on the samples themselves, not the solver's own bookkeeping
        errors.append(float(((w - res.weight) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum()))
        if pattern == "unstructured":
            assert int((~res.mask).sum()) == round(sparsity * w.numel()), method
        else:
            assert is_valid_n_m(res.mask, parse_pattern(pattern)), method
        assert torch.all(res.weight[~res.mask] == 0), method
    return sum(errors) / len(errors)


@pytest.mark.parametrize("sparsity,pattern", CASES)
def test_cap_is_best_and_baselines_are_ordered(sparsity: float, pattern: str) -> None:
    errors = {m: mean_error(m, sparsity, pattern, 128 if m in ("cap", "sparsegpt") else None)
              for m in ("cap", "sparsegpt", "obs", "wanda", "magnitude")}
    errors["cap whole rows"] = mean_error("cap", sparsity, pattern, None)
    others = {m: e for m, e in errors.items() if not m.startswith("cap")}
    assert errors["cap"] < min(others.values()), errors
    assert errors["cap whole rows"] < min(others.values()), errors
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], errors


def test_cap_rows_differ_but_layer_total_is_exact() -> None:
    w, _, h = correlated_problem(rows=32, cols=128, samples=512, seed=11, dtype=torch.float32)
    w[0] *= 0.05                                         # a quiet row should give up more weights
    res = prune_layer(w, h, method="cap", sparsity=0.5, block_size=64)
    per_row = (~res.mask).sum(1)
    assert int(per_row.sum()) == 32 * 64
    assert int(per_row[0]) > int(per_row[1:].float().mean())


def test_loss_curve_matches_the_solved_loss_at_the_target() -> None:
    w, _, h = correlated_problem(rows=16, cols=64, samples=512, seed=4)
    res = prune_layer(w, h, method="cap", sparsity=0.5, damp=0.0)
    assert res.curve is not None
    assert torch.all(res.curve.loss[1:] >= res.curve.loss[:-1])
    assert res.curve.at(0.5) == pytest.approx(res.loss, rel=1e-6)
    assert res.curve.at(0.0) == 0.0
