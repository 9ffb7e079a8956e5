"""Bad input gets a clear error naming the problem; numerics degrade gracefully and say so."""

from __future__ import annotations

import logging

import pytest
import torch

from cap_dist.solvers import prune_layer

from tests.solvers.synthetic import correlated_problem


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    w, _, h = correlated_problem(rows=4, cols=16, samples=64, seed=0, dtype=torch.float32)
    return w, h


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.2), r"sparsity=1.2 is outside \[0, 1\)"),
    (dict(sparsity=-0.1), "outside"),
    (dict(sparsity=float("nan")), "outside"),
    (dict(sparsity=0.5, method="prune-harder"), "method='prune-harder' is not one of"),
    (dict(sparsity=0.5, pattern="3:2"), "need 0 < N < M"),
    (dict(sparsity=0.5, pattern="half"), "neither 'unstructured' nor 'N:M'"),
    (dict(sparsity=0.5, pattern="2:5"), "multiple of 5"),
    (dict(sparsity=0.5, pattern="2:4", block_size=6), "multiple of M=4"),
    (dict(sparsity=0.5, block_size=0), "positive integer"),
    (dict(sparsity=0.5, damp=-1.0), "damp=-1.0 must be >= 0"),
    (dict(sparsity=0.5, backend="fortran"), "backend='fortran'"),
])
def test_bad_arguments(layer, kwargs, message) -> None:
    w, h = layer
    kwargs = {"method": "cap", **kwargs}
    with pytest.raises(ValueError, match=message):
        prune_layer(w, h, **kwargs)


def test_shapes_that_disagree(layer) -> None:
    w, h = layer
    with pytest.raises(ValueError, match=r"does not match weight \(4, 16\)"):
        prune_layer(w, h[:8, :8], method="cap", sparsity=0.5)
    with pytest.raises(ValueError, match="must be 2-D"):
        prune_layer(w.reshape(4, 4, 4), h, method="cap", sparsity=0.5)
    with pytest.raises(ValueError, match="do not tile"):
        prune_layer(w, torch.eye(5).repeat(3, 1, 1), method="cap", sparsity=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian(layer, bad) -> None:
    w, h = layer
    h = h.clone()
    h[3, 5] = bad
    for method in ("cap", "sparsegpt", "obs", "wanda"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            prune_layer(w, h, method=method, sparsity=0.5)


def test_fisher_only_methods_reject_fisher_blocks(layer) -> None:
    w, _ = layer
    blocks = torch.eye(8).repeat(8, 1, 1)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match="input-activation curvature"):
            prune_layer(w, blocks, method=method, sparsity=0.5)


def test_singular_hessian_escalates_damping_and_says_so(caplog) -> None:
    x = torch.randn(3, 16, dtype=torch.float64)               # rank 3 < 16: singular without damping
    h = 2 / 3 * x.T @ x
    w = torch.randn(4, 16, dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        res = prune_layer(w, h, method="cap", sparsity=0.5, damp=0.0)
    assert res.info["escalations"] >= 1 and res.info["damp_used"] > 0
    assert "escalating relative damping" in caplog.text
    assert int((~res.mask).sum()) == 32


def test_dead_inputs_are_pruned_first_at_no_cost() -> None:
    w, x, _ = correlated_problem(rows=6, cols=16, samples=200, seed=3)
    x[:, [2, 9]] = 0.0                                       # two inputs that never fire
    h = 2 / x.shape[0] * x.T @ x
    res = prune_layer(w, h, method="cap", sparsity=2 / 16, damp=0.01)
    assert res.info["dead_inputs"] == 2
    assert torch.all(~res.mask[:, [2, 9]])
    assert res.loss == pytest.approx(0.0, abs=1e-12)


def test_all_zero_hessian_is_an_error(layer) -> None:
    w, _ = layer
    with pytest.raises(ValueError, match="saw no .*calibration input"):
        prune_layer(w, torch.zeros(16, 16), method="cap", sparsity=0.5)


def test_zero_sparsity_is_identity(layer) -> None:
    w, h = layer
    for method in ("cap", "sparsegpt", "obs", "wanda", "magnitude"):
        res = prune_layer(w, h, method=method, sparsity=0.0)
        assert res.mask.all()
        torch.testing.assert_close(res.weight, w)
