"""CAP against independent references: the least-squares optimum for its mask, and brute-force greedy OBS."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers import prune_layer

from tests.solvers.synthetic import correlated_problem


def least_squares_fill(w_dense: torch.Tensor, h: torch.Tensor, free: torch.Tensor,
                       fixed_values: torch.Tensor) -> torch.Tensor:
    """argmin over the ``free`` entries of (w − ŵ) H (w − ŵ)ᵀ with the other entries fixed:
    H_FF (ŵ_F − w_F) = −H_FO (ŵ_O − w_O)  (restricted normal equations)."""
    out = fixed_values.clone()
    other = ~free
    rhs = -h[free][:, other] @ (fixed_values[other] - w_dense[other])
    out[free] = w_dense[free] + torch.linalg.solve(h[free][:, free], rhs)
    return out


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_whole_rows_keep_least_squares_optimum(backend: str, sparsity: float) -> None:
    w, _, h = correlated_problem(rows=6, cols=24, samples=400, seed=1)
    res = prune_layer(w, h, method="cap", sparsity=sparsity, damp=0.0, backend=backend)
    assert int((~res.mask).sum()) == round(sparsity * w.numel())
    for r in range(w.shape[0]):
        kept = res.mask[r]
        expected = least_squares_fill(w[r], h, kept, torch.zeros_like(w[r]))
        torch.testing.assert_close(res.weight[r], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_last_block_is_least_squares_optimum_given_earlier_blocks(pattern: str) -> None:
    w, _, h = correlated_problem(rows=5, cols=32, samples=400, seed=2)
    res = prune_layer(w, h, method="cap", sparsity=0.6, pattern=pattern, block_size=8, damp=0.0)
    last = torch.zeros(32, dtype=torch.bool)
    last[24:] = True
    for r in range(w.shape[0]):
        free = last & res.mask[r]
        fixed = torch.where(last, torch.zeros_like(w[r]), res.weight[r])
        expected = least_squares_fill(w[r], h, free, fixed)
        torch.testing.assert_close(res.weight[r], expected, rtol=1e-5, atol=1e-8)


def brute_force_greedy_obs(w: torch.Tensor, h: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy OBS by re-inverting H restricted to the kept weights at every step."""
    kept = torch.ones_like(w, dtype=torch.bool)
    current = w.clone()
    order = []
    for _ in range(steps):
        idx = torch.nonzero(kept).flatten()
        hinv = torch.linalg.inv(h[idx][:, idx])
        scores = current[idx] ** 2 / torch.diagonal(hinv)
        p = int(idx[torch.argmin(scores)])
        order.append(p)
        kept[p] = False
        current = least_squares_fill(w, h, kept, torch.zeros_like(w))
    return order, current


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_whole_rows_equal_brute_force_greedy(backend: str, seed: int) -> None:
    w, _, h = correlated_problem(rows=1, cols=12, samples=200, seed=seed)
    steps = 8
    res = prune_layer(w, h, method="cap", sparsity=steps / 12, damp=0.0, backend=backend)
    order, expected = brute_force_greedy_obs(w[0], h, steps)
    pruned = torch.nonzero(~res.mask[0]).flatten().tolist()
    got_order = sorted(pruned, key=lambda p: int(res.removal_step[0, p]))
    assert got_order == order
    torch.testing.assert_close(res.weight[0], expected, rtol=1e-5, atol=1e-8)


def test_step_losses_sum_to_the_layer_objective() -> None:
    w, x, h = correlated_problem(rows=8, cols=48, samples=500, seed=5)
    for block in (None, 16):
        res = prune_layer(w, h, method="cap", sparsity=0.7, block_size=block, damp=0.0)
        direct = float(((w - res.weight) @ x.T).pow(2).sum()) / x.shape[0]
        assert res.loss == pytest.approx(direct, rel=1e-8)
        assert float(res.losses.sum()) == pytest.approx(direct, rel=1e-6)


def test_numba_and_torch_backends_agree_blocked() -> None:
    w, _, h = correlated_problem(rows=16, cols=64, samples=600, seed=7)
    a = prune_layer(w, h, method="cap", sparsity=0.75, block_size=16, backend="numba")
    b = prune_layer(w, h, method="cap", sparsity=0.75, block_size=16, backend="torch")
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-7, atol=1e-9)


def test_fisher_blocks_equal_brute_force_greedy_per_block() -> None:
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(300, 2, 8, generator=g, dtype=torch.float64)  # 300 samples of a [2, 8] weight
    grads[:, :, 1:] += 0.6 * grads[:, :, :-1]
    from cap_dist.solvers import FisherAccumulator
    acc = FisherAccumulator(numel=16, block_size=8, float64=True)
    acc.add_gradients(grads[:150])
    acc2 = FisherAccumulator(numel=16, block_size=8, float64=True)
    acc2.add_gradients(grads[150:])
    fisher = acc.merge(acc2).fisher()
    w = torch.randn(2, 8, generator=g, dtype=torch.float64)
    res = prune_layer(w, fisher, method="cap", sparsity=0.5, damp=0.0)
    assert int((~res.mask).sum()) == 8
    for b in range(2):
        k = int((~res.mask[b]).sum())
        _, expected = brute_force_greedy_obs(w[b], fisher[b], k)
        torch.testing.assert_close(res.weight[b], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("with_prior", [False, True])
def test_search_without_loss_curve_gives_the_same_result(backend: str, with_prior: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a loss curve the greedy searches blocks only as deep as their allocation needs and extends
    rows that reach that depth: the masks and weights must be those of the full-depth search. Row scales
    spread over 30× make the quiet rows take most removals, so rows do reach the shallow depth."""
    from cap_dist.solvers import cap, greedy

    w, _, h = correlated_problem(rows=24, cols=64, samples=600, seed=11)
    w = w * torch.logspace(-1, 0.5, 24, dtype=w.dtype).unsqueeze(1)
    prior = (torch.rand(24, 64, generator=torch.Generator().manual_seed(3)) < 0.15) if with_prior else None
    extended = []
    for name in ("greedy_numba", "greedy_torch"):
        original = getattr(greedy, name)

        def spy(weights, *args, _original=original, **kwargs):
            if kwargs.get("prefix") is not None and weights.shape[0] < 24:
                extended.append(weights.shape[0])
            return _original(weights, *args, **kwargs)
        monkeypatch.setattr(greedy, name, spy)
    assert cap.greedy_kernels(backend, w.device)[0] is getattr(greedy, f"greedy_{backend}")
    full = prune_layer(w, h, method="cap", sparsity=0.5, block_size=32, backend=backend, prior_mask=prior)
    assert full.curve is not None and not extended
    lean = prune_layer(w, h, method="cap", sparsity=0.5, block_size=32, backend=backend, prior_mask=prior,
                       loss_curve=False)
    assert extended, "no row reached the shallow depth: the test no longer covers the extension"
    assert lean.curve is None
    assert torch.equal(lean.mask, full.mask)
    assert torch.equal(lean.weight, full.weight)
    assert lean.loss == full.loss
