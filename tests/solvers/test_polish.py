"""The opt-in polish of prune_layer (refine / admm / resolve) and the faithful-baseline damping, against
independent references: per-row least squares on the final mask, the objective computed from the samples,
brute force over masks, and upstream SparseGPT's damping written out by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from cap_dist.solvers import is_valid_n_m, parse_pattern, prune_layer, relative_error
from cap_dist.solvers.numerics import blocked_cholesky, damped
from cap_dist.solvers.patterns import THRESHOLD_SAMPLE, lowest_k_mask, n_m_mask, threshold_keep
from cap_dist.solvers.polish import (admm_flops, admm_masks, admm_uses_explicit_inverse, better_rows, flip_order,
                                    refine_masks, resolve_weights)

from tests.solvers.synthetic import correlated_problem
from tests.solvers.test_cap_exactness import least_squares_fill


def sample_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - pruned) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())


@pytest.mark.parametrize("method,pattern", [("cap", "unstructured"), ("cap", "2:4"), ("sparsegpt", "unstructured"),
                                            ("wanda", "2:4")])
def test_resolve_is_the_least_squares_optimum_of_every_row(method: str, pattern: str) -> None:
    w, _, h = correlated_problem(rows=10, cols=48, samples=400, seed=6)
    res = prune_layer(w, h, method=method, sparsity=0.6, pattern=pattern, block_size=16, resolve=True,
                      polish_damp=0.0)
    for r in range(w.shape[0]):
        expected = least_squares_fill(w[r], h, res.mask[r], torch.zeros_like(w[r]))
        torch.testing.assert_close(res.weight[r], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("seed", range(3))
def test_resolve_and_refine_never_raise_the_undamped_error(damp: float, seed: int) -> None:
    """They minimise the damped objective; the true one (from the samples) must still not get worse."""
    w, x, h = correlated_problem(rows=12, cols=64, samples=300, seed=seed)
    for pattern in ("unstructured", "2:4"):
        base = prune_layer(w, h, method="cap", sparsity=0.6, pattern=pattern, block_size=16, damp=damp)
        for kw in (dict(resolve=True), dict(refine=2, refine_block=32), dict(admm=30, resolve=True)):
            res = prune_layer(w, h, method="cap", sparsity=0.6, pattern=pattern, block_size=16, damp=damp, **kw)
            assert sample_error(w, res.weight, x) <= sample_error(w, base.weight, x) * (1 + 1e-9), (pattern, kw)
            assert res.relative_error == pytest.approx(sample_error(w, res.weight, x), rel=1e-9)


@pytest.mark.parametrize("kw", [dict(refine=2, refine_block=16), dict(admm=40), dict(refine=1, admm=40, resolve=True)])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_polished_masks_keep_sparsity_groups_and_prior(kw: dict, pattern: str) -> None:
    w, _, h = correlated_problem(rows=16, cols=64, samples=400, seed=8)
    if pattern == "2:4":
        prior = ~prune_layer(w, h, method="magnitude", sparsity=0.0, pattern="3:4").mask
    else:
        prior = ~prune_layer(w, h, method="cap", sparsity=0.3, block_size=16).mask
    w_prev = w * ~prior
    res = prune_layer(w_prev, h, method="cap", sparsity=0.7, pattern=pattern, block_size=16, prior_mask=prior,
                      polish_damp=1e-4, **kw)
    assert not bool((res.mask & prior).any())
    assert bool((res.weight[~res.mask] == 0).all())
    if pattern == "2:4":
        assert is_valid_n_m(res.mask, parse_pattern("2:4"))
    else:
        assert int((~res.mask).sum()) == round(0.7 * w.numel())


def test_refine_gain_is_the_exact_fall_of_the_damped_objective() -> None:
    """Δ of (3) is bookkeeping only; recompute the damped objective directly from the weights."""
    w, _, h = correlated_problem(rows=8, cols=48, samples=300, seed=9)
    base = prune_layer(w, h, method="cap", sparsity=0.5, block_size=8)
    hs = damped(h, 0.01)[0]

    def objective(x: torch.Tensor) -> float:
        e = w - x
        return float(((e @ hs) * e).sum())

    new_w, new_keep, info = refine_masks(w, base.weight, base.mask, h, parse_pattern("unstructured"), None,
                                         width=16, sweeps=3, damp=0.01)
    assert info["refine_gain"] > 0
    assert objective(base.weight) - objective(new_w) == pytest.approx(info["refine_gain"], rel=1e-8)
    assert int((~new_keep).sum()) == int((~base.mask).sum())


def test_refine_numba_and_torch_kernels_agree() -> None:
    w, _, h = correlated_problem(rows=12, cols=64, samples=300, seed=10)
    a = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, refine=2, refine_block=32, backend="numba")
    b = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, refine=2, refine_block=32, backend="torch")
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-10)


def test_polish_reaches_the_brute_force_optimum_more_often_than_the_greedy() -> None:
    """Single rows of 10 weights keeping 4: every mask tried, each with its least-squares weights."""
    hits = {"cap": 0, "polished": 0}
    for seed in range(12):
        w, _, h = correlated_problem(rows=1, cols=10, samples=60, seed=100 + seed, rho=0.9)
        best = min(float(((w[0] - v) @ h @ (w[0] - v))) for v in (
            least_squares_fill(w[0], h, torch.tensor([i in kept for i in range(10)]), torch.zeros(10, dtype=w.dtype))
            for kept in itertools.combinations(range(10), 4)))
        for name, kw in (("cap", {}), ("polished", dict(refine=2, admm=60, resolve=True))):
            res = prune_layer(w, h, method="cap", sparsity=0.6, damp=0.0, polish_damp=0.0, **kw)
            loss = 2 * res.loss
            assert loss >= best * (1 - 1e-9)
            hits[name] += loss <= best * (1 + 1e-7)
    assert hits["polished"] > hits["cap"], hits


def test_mean_damping_is_upstream_sparsegpt_numerics() -> None:
    """damp_mode='mean' = running the undamped method on H + damp·mean(diag H)·I, dead inputs at 1, zeroed."""
    w, _, h = correlated_problem(rows=8, cols=32, samples=300, seed=12)
    h[3, :] = 0.0
    h[:, 3] = 0.0
    by_hand = h.clone()
    by_hand[3, 3] = 1.0
    by_hand += 0.01 * float(torch.diagonal(by_hand).mean()) * torch.eye(32, dtype=h.dtype)
    w_dead = w.clone()
    w_dead[:, 3] = 0.0
    for method in ("sparsegpt", "obs"):
        got = prune_layer(w, h, method=method, sparsity=0.5, damp_mode="mean")
        ref = prune_layer(w_dead, by_hand, method=method, sparsity=0.5, damp=0.0)
        assert torch.equal(got.mask, ref.mask), method
        torch.testing.assert_close(got.weight, ref.weight, rtol=1e-10, atol=1e-12)
        assert got.info["damp_used"] == 0.01


def test_relative_error_is_measured_on_the_samples() -> None:
    w, x, h = correlated_problem(rows=6, cols=32, samples=200, seed=13)
    res = prune_layer(w, h, method="sparsegpt", sparsity=0.5)
    assert relative_error(w, res.weight, h) == pytest.approx(sample_error(w, res.weight, x), rel=1e-9)
    assert res.relative_error == pytest.approx(sample_error(w, res.weight, x), rel=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    (dict(damp_mode="upstream"), "damp_mode"), (dict(refine=-1), "refine"), (dict(refine=True), "refine"),
    (dict(refine_block=0), "refine_block"), (dict(admm=-2), "admm"), (dict(admm_rho=0.0), "admm_rho"),
    (dict(polish_damp=-1.0), "polish_damp")])
def test_bad_polish_arguments(kwargs: dict, message: str) -> None:
    w, _, h = correlated_problem(rows=4, cols=16, samples=100, seed=0)
    with pytest.raises(ValueError, match=message):
        prune_layer(w, h, method="cap", sparsity=0.5, **kwargs)


def test_fisher_curvature_has_no_polish() -> None:
    w = torch.randn(4, 16, dtype=torch.float64)
    fisher = torch.eye(8, dtype=torch.float64).expand(8, 8, 8).clone()
    with pytest.raises(ValueError, match="activation curvature"):
        prune_layer(w, fisher, method="cap", sparsity=0.5, resolve=True)


def test_prune_layer_default_block_is_the_recipes() -> None:
    """prune_layer without block_size solves as a default recipe does (128 columns), not whole rows."""
    from cap_dist.config import PruneConfig
    from cap_dist.solvers import DEFAULT_CAP_BLOCK

    w, _, h = correlated_problem(rows=6, cols=320, samples=800, seed=3, dtype=torch.float32)
    assert PruneConfig().block_size == DEFAULT_CAP_BLOCK == 128
    default = prune_layer(w, h, method="cap", sparsity=0.5)
    blocked = prune_layer(w, h, method="cap", sparsity=0.5, block_size=128)
    whole = prune_layer(w, h, method="cap", sparsity=0.5, block_size=None)
    assert torch.equal(default.weight, blocked.weight)
    assert not torch.equal(default.weight, whole.weight)      # the blocks make a difference on this layer


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_recipe_default_cap_solve_beats_plain_cap_and_keeps_guarantees(pattern: str, sparsity: float) -> None:
    """core.solve_layer with a default recipe polishes (resolve + ADMM): never worse than plain CAP on the samples,
    exact count / valid groups, and weights already zero stay zero (gradual pruning)."""
    from cap_dist.config import PruneConfig
    from cap_dist.core import prior_mask_of, solve_layer

    w, x, h = correlated_problem(rows=24, cols=96, samples=600, seed=11, dtype=torch.float32)
    zeros = [0, 1, 4]                                                # an earlier step's zeros (prior mask)
    w[:, zeros] = 0.0
    layer = torch.nn.Linear(96, 24, bias=False)
    layer.weight.data = w.clone()
    cfg = PruneConfig(sparsity=sparsity, pattern=pattern, block_size=32)
    record = solve_layer("fc", "independent", layer, h, cfg, cfg.layer_sparsity)
    plain = prune_layer(w, h, method="cap", sparsity=sparsity, pattern=pattern, block_size=32,
                        prior_mask=prior_mask_of(w, cfg))
    pruned = layer.weight.data
    assert bool((pruned[:, zeros] == 0).all())
    assert sample_error(w.double(), pruned.double(), x.double()) <= sample_error(w.double(), plain.weight.double(),
                                                                                 x.double()) * (1 + 1e-6)
    assert record.rel_error == pytest.approx(sample_error(w.double(), pruned.double(), x.double()), rel=1e-4)
    assert record.rel_error < plain.relative_error * 0.99            # the polish ran (it gains here)
    if pattern == "2:4":
        assert is_valid_n_m(pruned != 0, parse_pattern("2:4"))
    else:
        assert int((pruned == 0).sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_explicit_inverse_and_triangular_solves_agree(pattern: str) -> None:
    """The two forms of ADMM's linear step are one arithmetic: same masks, weights equal to rounding, and
    both keep the exact count / groups and the prior zeros."""
    w, _, h = correlated_problem(rows=16, cols=64, samples=400, seed=21)
    prior = torch.zeros_like(w, dtype=torch.bool)
    prior[:, [0, 5, 9, 14]] = True                                     # at most one per group of 4
    base = prune_layer(w * ~prior, h, method="cap", sparsity=0.6, pattern=pattern, block_size=16, prior_mask=prior)
    pat = parse_pattern(pattern)
    out = {mode: admm_masks(w * ~prior, base.weight, base.mask, h, pat, prior, iterations=60, damp=0.01,
                            inverse=mode) for mode in ("explicit", "cholesky")}
    assert out["explicit"][2]["admm_inverse"] == "explicit" and out["cholesky"][2]["admm_inverse"] == "cholesky"
    assert torch.equal(out["explicit"][1], out["cholesky"][1])
    torch.testing.assert_close(out["explicit"][0], out["cholesky"][0], rtol=1e-8, atol=1e-10)
    mask = out["cholesky"][1]
    assert not bool((mask & prior).any())
    assert int((~mask).sum()) == int((~base.mask).sum())
    if pattern == "2:4":
        assert is_valid_n_m(mask, pat)
    with pytest.raises(ValueError, match="inverse"):
        admm_masks(w, base.weight, base.mask, h, pat, None, iterations=3, damp=0.01, inverse="eigen")


def test_flipping_admm_support_is_decided_by_the_re_solved_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    """When ADMM ends flipping between two supports, both are re-solved and the lower re-solved objective wins,
    whichever the projection preferred, with rows of equal kept count taken from whichever is lower: here ADMM
    "prefers" the greedy's own support and offers a better one (plain ADMM's) as the alternative; the layer
    ends at or below the better re-solved support, every row at the least-squares optimum of its mask."""
    import cap_dist.solvers as solvers

    w, _, h = correlated_problem(rows=12, cols=48, samples=400, seed=8)
    greedy = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16)
    greedy_resolved = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, resolve=True, polish_damp=0.0)
    better = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, admm=80, resolve=True, polish_damp=0.0)
    assert not torch.equal(better.mask, greedy.mask) and better.loss < greedy_resolved.loss

    def flipping(dense, weight, keep, hessian, pattern, prior, **kw):
        return weight, keep, dict(admm_iterations=1, admm_moved=0, admm_alternative=(better.mask, better.weight))

    monkeypatch.setattr(solvers, "admm_masks", flipping)
    res = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, admm=5, resolve=True, polish_damp=0.0)
    assert res.info["admm_support_choice"] == "re-solved choice"
    assert res.loss <= better.loss * (1 + 1e-6)
    assert int((~res.mask).sum()) == int((~greedy.mask).sum())
    assert res.info["admm_moved"] == int((res.mask != greedy.mask).sum()) // 2
    assert res.info["resolve_loss"] == pytest.approx(res.loss, rel=1e-6)
    for r in range(w.shape[0]):
        expected = least_squares_fill(w[r], h, res.mask[r], torch.zeros_like(w[r]))
        torch.testing.assert_close(res.weight[r], expected, rtol=1e-4, atol=1e-6)

    def flipping_worse(dense, weight, keep, hessian, pattern, prior, **kw):
        return better.weight, better.mask, dict(admm_iterations=1, admm_moved=0,
                                                admm_alternative=(greedy.mask, greedy.weight))

    monkeypatch.setattr(solvers, "admm_masks", flipping_worse)
    res = prune_layer(w, h, method="cap", sparsity=0.6, block_size=16, admm=5, resolve=True, polish_damp=0.0)
    assert res.info["admm_support_choice"] == "projection's choice" and res.loss <= better.loss * (1 + 1e-6)


def test_better_rows_swaps_only_rows_of_equal_count_and_never_worsens() -> None:
    """Row r of the result is the lower of the two where both keep as many weights, else the better whole
    solution's row; the layer's kept count is the base's."""
    keep_a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    keep_b = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    w_a, w_b = keep_a.double() * 1.0, keep_b.double() * 2.0
    f_a, f_b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.1, 3.0])   # sums: 3.0 vs 3.6: a is the base
    w, keep, f, info = better_rows((w_a, keep_a, f_a), (w_b, keep_b, f_b))
    assert info == dict(base="first", rows_from_other=1)                  # row 1 differs in count: not swapped
    assert torch.equal(keep, torch.stack([keep_b[0], keep_a[1], keep_a[2]]))
    assert torch.equal(w, torch.stack([w_b[0], w_a[1], w_a[2]]))
    assert torch.equal(f, torch.tensor([0.5, 1.0, 1.0])) and int(keep.sum()) == int(keep_a.sum())
    _, _, f2, info2 = better_rows((w_b, keep_b, f_b), (w_a, keep_a, f_a))
    assert info2["base"] == "second" and torch.equal(f2, f)


def test_threshold_keep_is_the_exact_lowest_k_selection() -> None:
    """Small and large layers (the sampled band: hit, missed, at the ends), prior zeros (−inf) and ties: it
    removes exactly the k lowest, ties in index order."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 50, generator=g)
    scores[0, :7] = -torch.inf
    for k in (0, 7, 600, 1999, 2000):
        keep, _ = threshold_keep(scores, k)
        assert torch.equal(keep, lowest_k_mask(scores, k)), k
    large = torch.rand(256, 4 * THRESHOLD_SAMPLE // 256 + 64, generator=g)       # the sampled band is used
    large[:3, :100] = -torch.inf
    n = large.numel()
    for k in (1, 299, 300, 301, n // 3, n // 2, n - 2):
        keep, thr = threshold_keep(large, k)
        assert int((~keep).sum()) == k and float(large[~keep].max()) <= float(large[keep].min()), k
        if k <= 300:                                      # among the 300 tied −inf, the first in index order
            assert torch.equal(torch.nonzero(~keep.reshape(-1)).flatten(),
                               torch.nonzero(large.reshape(-1) == -torch.inf).flatten()[:k])
        else:
            assert torch.equal(keep, lowest_k_mask(large, k)) and bool((large[keep] > thr).all()), k
    skewed = large.clone().reshape(-1)
    step = n // THRESHOLD_SAMPLE
    skewed[::step] = 0.0                                  # the strided sample sees only zeros: its band misses
    skewed = skewed.reshape(large.shape)
    keep, _ = threshold_keep(skewed, n // 2)
    assert torch.equal(keep, lowest_k_mask(skewed, n // 2))
    tied = torch.ones(10, 10)
    tied[0, 0] = 0.5
    keep, thr = threshold_keep(tied, 5)                   # ties at the threshold: the first in index order go
    assert thr == 1.0 and int((~keep).sum()) == 5 and not bool(keep[0, 0])
    assert torch.equal(~keep.reshape(-1)[1:], torch.arange(99) < 4)
    nan = torch.rand(600, 600, generator=g)
    nan[5, 5] = float("nan")
    keep, _ = threshold_keep(nan, 1000)
    assert int((~keep).sum()) == 1000 and bool(keep[5, 5])


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "8:16"])
def test_n_m_mask_by_ranks_is_the_lowest_per_group(pattern: str) -> None:
    """The rank path (many groups, M ≤ 8) and the top-k path remove exactly the M − N lowest of every group;
    ties go to the earlier column, −inf (prior zeros) first, NaN is kept (the top-k's order)."""
    pat = parse_pattern(pattern)
    g = torch.Generator().manual_seed(5)
    for rows in (3, 512):                                 # 3 rows: the top-k path; 512: ranks where M ≤ 8
        scores = torch.rand(rows, 64, generator=g)
        scores[0, : pat.n_prune] = -torch.inf
        keep = n_m_mask(scores, pat)
        assert is_valid_n_m(keep, pat) and not bool(keep[0, : pat.n_prune].any())
        groups = scores.reshape(rows, -1, pat.m)
        kept = keep.reshape(rows, -1, pat.m)
        highest_removed = torch.where(kept, -torch.inf, groups).amax(-1)
        lowest_kept = torch.where(kept, groups, torch.inf).amin(-1)
        assert bool((highest_removed <= lowest_kept).all())
    tied = torch.zeros(512, 64)
    tied[:, 1::pat.m] = -1.0
    keep = n_m_mask(tied, pat)                            # ties at 0: the earliest columns of each group go
    assert is_valid_n_m(keep, pat) and not bool(keep[:, 1::pat.m].any())
    if pat.m <= 8:
        expected = torch.ones(pat.m, dtype=torch.bool)
        expected[1] = False
        expected[[c for c in range(pat.m) if c != 1][: pat.n_prune - 1]] = False
        assert torch.equal(keep.reshape(512, -1, pat.m), expected.expand(512, 64 // pat.m, pat.m))
    nan = torch.rand(512, 64, generator=g)
    nan[7, 2] = float("nan")
    keep = n_m_mask(nan, pat)
    assert is_valid_n_m(keep, pat) and bool(keep[7, 2])


def test_blocked_cholesky_is_the_cholesky_factor_and_reports_failure() -> None:
    """Blocks of columns or LAPACK: L is lower triangular with LLᵀ = A to rounding, the same factor as
    LAPACK's; a matrix that is not positive definite reports the order of the failing leading minor."""
    g = torch.Generator().manual_seed(2)
    for n in (300, 2100):                                 # LAPACK's, and by blocks (ragged last block)
        a = torch.randn(n, n + 50, generator=g, dtype=torch.float64)
        spd = a @ a.T / n + 1e-3 * torch.eye(n, dtype=torch.float64)
        factor, info = blocked_cholesky(spd)
        assert info == 0 and bool((factor.triu(1) == 0).all())
        torch.testing.assert_close(factor, torch.linalg.cholesky(spd), rtol=1e-9, atol=1e-10)
        bad = spd.clone()
        bad[n - 5, n - 5] = -1.0
        assert blocked_cholesky(bad)[1] == int(torch.linalg.cholesky_ex(bad).info) == n - 4


def test_flip_order_ranks_two_supports_as_their_objectives_do() -> None:
    """flip_order's difference of the two projections' objectives, sparse or dense, against both objectives
    computed in full (float64)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    hn = a @ a.T / 64 + 0.01 * torch.eye(64, dtype=torch.float64)
    w0, b = torch.randn(40, 64, generator=g, dtype=torch.float64), torch.randn(40, 64, generator=g, dtype=torch.float64)
    first = torch.rand(40, 64, generator=g) > 0.5
    for flips in (1, 3, 30, 1200):                        # few differing entries: sparse product; many: dense
        for trial in range(4):
            second = first.clone()
            second.view(-1)[torch.randperm(first.numel(), generator=g)[:flips]] ^= True
            f1, f2 = (float(((w0 - b * k) @ hn * (w0 - b * k)).sum()) for k in (first, second))
            assert flip_order(w0, b, hn, first, second) == (f1 <= f2)
            assert flip_order(w0, b, hn, second, first) == (f2 <= f1)


def test_resolve_reports_the_undamped_loss_of_what_it_returns() -> None:
    w, _, h = correlated_problem(rows=8, cols=32, samples=200, seed=5, dtype=torch.float32)
    base = prune_layer(w, h, method="cap", sparsity=0.5, block_size=8)
    out, info = resolve_weights(w, base.weight, base.mask, h, damp=0.01)
    e = w.double() - out.double()
    assert info["resolve_loss"] == pytest.approx(0.5 * float(((e @ h.double()) * e).sum()), rel=1e-12)


def test_admm_width_policy_follows_the_cost_of_an_iteration() -> None:
    """The explicit inverse where in < 3·rows; the cost model counts one product's flops per iteration and the
    Cholesky factor (and there its inverse, elsewhere the blocked solver's weights) every third iteration, no
    eigendecomposition."""
    assert admm_uses_explicit_inverse(1280, 320) and not admm_uses_explicit_inverse(768, 3072)
    product = 2.0 * 1536 * 6144 ** 2
    assert admm_flops(1536, 6144, 9) == pytest.approx(9 * product + 4 * 6144 ** 3 / 2)
    assert admm_flops(1280, 320, 9) == pytest.approx(9 * 2.0 * 1280 * 320 ** 2 + 4 * 320 ** 3)
