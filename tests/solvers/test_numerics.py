"""Factorisations against direct linear algebra."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers.numerics import damped, inverse_factor, lower_triangular_inverse

from tests.solvers.synthetic import correlated_problem


@pytest.mark.parametrize("n, leaf", [(5, 256), (37, 4), (64, 8)])
def test_lower_triangular_inverse_by_halves(n: int, leaf: int) -> None:
    g = torch.Generator().manual_seed(n)
    lower = torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64)) + 3.0 * torch.eye(n, dtype=torch.float64)
    inv = lower_triangular_inverse(lower, leaf=leaf)
    assert torch.equal(inv, torch.tril(inv))
    torch.testing.assert_close(inv @ lower, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["relative", "mean"])
def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(mode: str, monkeypatch) -> None:
    """U = J·L̃⁻¹·J must be H⁻¹'s upper Cholesky factor: the same as factoring the inverse directly."""
    from cap_dist.solvers import numerics

    monkeypatch.setattr(numerics, "TRIANGULAR_INVERSE_LEAF", 8)
    _, _, h = correlated_problem(rows=2, cols=48, samples=300, seed=4)
    h[:, 3] = h[3, :] = 0.0                                        # a dead input
    u, fac = inverse_factor(h, 0.01, torch.float64, mode)
    assert fac.inverse is None and fac.dead_inputs == 1
    expected = torch.linalg.cholesky(torch.linalg.inv(damped(h, 0.01, mode)[0]), upper=True)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(u, torch.triu(u))
