"""The oneDNN route for the solvers' float32 products and SPD solves, against float64 references."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers.numerics import blocked_cholesky
from cap_dist.solvers.products import SpdSolver, linear, matmul, onednn_active, use_onednn


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _spd(n: int, seed: int, shift: float = 0.03) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 40, generator=g, dtype=torch.float64)
    h = a @ a.T / n
    s = h.diagonal().sqrt()
    return h / s[:, None] / s[None] + shift * torch.eye(n, dtype=torch.float64)


def test_onednn_route_is_taken_on_this_cpu() -> None:
    """The machines this project runs on have oneDNN in torch's CPU build: the fast route must not silently be off."""
    assert torch.backends.mkldnn.is_available()
    assert onednn_active()
    with use_onednn(False):
        assert not onednn_active()
    assert onednn_active()


@pytest.mark.parametrize("route", [True, False])
def test_linear_is_x_times_w_transposed_for_every_layout(route: bool) -> None:
    """Contiguous, column-major and padded (strided) weights, a column slice of a wider x, an empty x, and
    float64 (torch's product): all equal x·wᵀ to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x64, w64 = torch.randn(70, 300, generator=g, dtype=torch.float64), torch.randn(90, 300, generator=g, dtype=torch.float64)
    want = x64 @ w64.T
    x, w = x64.float(), w64.float()
    wide = torch.randn(70, 333, generator=g)
    wide[:, 20:320] = x
    padded = torch.randn(95, 310, generator=g)
    padded[3:93, 5:305] = w
    with use_onednn(route):
        for xx, ww in ((x, w), (x, w.T.contiguous().T), (wide[:, 20:320], w), (x, padded[3:93, 5:305])):
            got = linear(xx, ww)
            assert got.dtype == torch.float32 and got.shape == (70, 90)
            assert _rel(got, want) < 2e-6
        assert _rel(matmul(x, w.T), want) < 2e-6
        assert linear(x[:0], w).shape == (0, 90)
        broadcast = x[:1].expand(70, 300)                                 # rows with stride 0
        assert _rel(linear(broadcast, w), (x64[:1] @ w64.T).expand(70, 90)) < 2e-6
        torch.testing.assert_close(linear(x64, w64), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [100, 256, 700])                     # one block, exactly one, ragged blocks
def test_spd_solver_solves_like_a_float64_cholesky(n: int) -> None:
    a64 = _spd(n, seed=n)
    r64 = torch.randn(33, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.cholesky_solve(r64.T, torch.linalg.cholesky(a64)).T
    for route in (True, False):
        with use_onednn(route):
            solver, info = SpdSolver.factor(a64.float())
            assert info == 0
            got = solver.solve(r64.float())
            assert _rel(got, want) < 2e-5
            inplace = r64.float().clone()
            assert solver.solve_(inplace) is inplace
            torch.testing.assert_close(inplace, got, rtol=0, atol=0)
            torch.testing.assert_close(solver.lower.tril(), torch.linalg.cholesky(a64).float(), rtol=1e-4, atol=1e-5)
    solver, _ = SpdSolver.factor(a64)                                 # float64: LAPACK's solves, to float64 rounding
    assert _rel(solver.solve(r64), want) < 1e-12


def test_spd_solver_reuses_buffers_and_reports_a_failing_minor() -> None:
    """A refactorisation into another solver's buffers gives that matrix's solves; a matrix that is not positive
    definite reports the order of its failing leading minor, as LAPACK does, through either route."""
    first, second = _spd(600, seed=3), _spd(600, seed=4, shift=0.2)
    r = torch.randn(20, 600, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver, _ = SpdSolver.factor(first.float())
    again, info = SpdSolver.factor(second.float(), reuse=solver)
    assert info == 0 and again.forward[0].data_ptr() == solver.forward[0].data_ptr()
    assert _rel(again.solve(r.float()), torch.linalg.solve(second, r.T).T) < 2e-5
    bad = first.float().clone()
    bad[400, 400] = -1.0
    want = int(torch.linalg.cholesky_ex(bad).info)
    for route in (True, False):
        with use_onednn(route):
            assert SpdSolver.factor(bad) == (None, want) == (None, 401)
    for view in (torch.zeros(600, 20).T, torch.zeros(20, 650)[:, 25:625]):     # not contiguous: solved alike
        view.copy_(r.float())
        assert again.solve_(view) is view
        assert _rel(view, torch.linalg.solve(second, r.T).T) < 2e-5


def test_blocked_cholesky_in_float32_through_onednn() -> None:
    """The blocked factor's products go through oneDNN in float32: still LAPACK's factor to float32 rounding."""
    spd = _spd(2300, seed=5)
    factor, info = blocked_cholesky(spd.float())
    assert info == 0 and bool((factor.triu(1) == 0).all())
    assert _rel(factor, torch.linalg.cholesky(spd)) < 1e-5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_cap_with_admm_and_resolve_alike_through_either_route(pattern: str) -> None:
    """The whole default `cap` (greedy, ADMM, re-solve) on a wide correlated layer: the oneDNN route and torch's
    products end at the same error to float32 noise, with valid masks and the exact count."""
    from cap_dist.solvers import DEFAULT_CAP_ADMM, prune_layer, relative_error

    from tests.solvers.synthetic import correlated_problem

    w, _, h = correlated_problem(rows=48, cols=2304, samples=3000, seed=7)
    errors = []
    for route in (True, False):
        with use_onednn(route):
            res = prune_layer(w.float(), h.float(), method="cap", sparsity=0.5, pattern=pattern,
                              admm=DEFAULT_CAP_ADMM, resolve=True)
        assert int((~res.mask).sum()) == w.numel() // 2 and res.info["admm_iterations"] > 0
        errors.append(relative_error(w, res.weight, h))
    assert abs(errors[0] - errors[1]) <= 0.01 * errors[1]


def test_a_kept_weight_never_reads_as_pruned() -> None:
    """A kept weight solved to exactly 0 is stored as ±tiny with its dense sign (masks are recovered as weight != 0
    downstream); pruned weights and dense zeros stay 0; nothing else changes."""
    from cap_dist.solvers import keep_kept_nonzero

    dense = torch.tensor([[0.5, -0.25, 0.0, 1.0], [-2.0, 0.0, 3.0, 0.75]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    pruned = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-1.5, 0.0, 2.5, 0.0]])
    out, count = keep_kept_nonzero(pruned, mask, dense)
    tiny = torch.finfo(torch.float32).tiny
    assert count == 3
    assert out.tolist() == [[tiny, -tiny, 0.0, 0.0], [-1.5, 0.0, 2.5, tiny]]
    assert torch.equal(out != 0, mask & (dense != 0))
    assert keep_kept_nonzero(out, mask, dense)[1] == 0
