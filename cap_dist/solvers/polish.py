"""After the greedy: better masks by exact block re-search, and exact weights on the final mask.

The layer objective, for a mask K (True = kept) and damped curvature Hₛ, is
    f(Ŵ) = Σ_r (w_r − ŵ_r) Hₛ (w_r − ŵ_r)ᵀ   with ŵ_r = 0 off K_r.                       (1)
CAP's blocked greedy fixes each block's mask before the columns to its right are known, and its weights
are exact only for the block structure, not for (1).  Two post-processing steps fix that:

**Refinement (block re-search).**  With every column outside a block b held at its current value, the
block's part of (1) is, up to a constant, (t_b − ŵ_b) Hₛ,bb (t_b − ŵ_b)ᵀ per row with the target
    t_b = ŵ_b + G_b Hₛ,bb⁻¹ ,   G = (W − Ŵ) Hₛ                                               (2)
(the block's unconstrained optimum given the rest).  CAP's own exact greedy OBS kernel searches that
sub-problem from t_b — the same per-row counts (or N:M groups, prior zeros first) — and replays it to
the exact block optimum for its new mask.  A row takes the candidate only when the exact change
    Δ_r = 2 d_r·G_r,b + d_r Hₛ,bb d_rᵀ ,   d = Ŵ_b,old − Ŵ_b,new                              (3)
is negative, so (1) never increases, the per-row counts (hence the layer's exact sparsity, N:M
validity and prior zeros) never change.  Unstructured layers may also re-spread the block's removals
over rows (the greedy's loss ranking, as CAP allocates); that candidate is taken for the whole block
when its summed Δ beats the per-row choice.  Sweeps alternate block offsets so that masks can move
across the greedy's block boundaries.

**Re-solve.**  For the final mask, (1) is minimised exactly per row: (Hₛ ŵ)_K = (Hₛ w)_K on K, a
symmetric positive definite system in each row, solved for all rows at once by Jacobi-preconditioned
conjugate gradients (one [rows, n]·[n, n] product per iteration), warm-started from the greedy's
weights; a row keeps its old weights if the new ones are not better on the undamped H.
"""

from __future__ import annotations

import math
import time

import torch

from cap_dist.solvers.numerics import blocked_cholesky, damped, row_quadratic_forms
from cap_dist.solvers.patterns import Pattern, allocate_rows, n_m_mask, removal_order, threshold_keep
from cap_dist.solvers.products import SpdSolver, linear

RESOLVE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
"""A row's conjugate gradients stop when a step lowers its objective by less than this fraction (or its
relative residual is below it), per working precision: float64 solves to the optimum; float32 to the
objective's own precision (the last 1e-6 of the objective is rounding there)."""
RESOLVE_MAX_ITER = 200
RESOLVE_TYPICAL_ITERATIONS = 20
"""Where the re-solve typically stops after ADMM (18-20 steps on bench/peers.py's layers): a cost estimate."""
ADMM_TYPICAL_ITERATIONS = 45
"""Where ADMM's early stop typically ends (40-50 iterations on bench/peers.py's layers): a cost estimate."""


def row_objective(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(w_r − ŵ_r) H (w_r − ŵ_r)ᵀ for every row: the per-row layer objective on ``hessian``."""
    return row_quadratic_forms(dense.to(hessian.dtype) - weight.to(hessian.dtype), hessian)


def damped_curvature(hessian: torch.Tensor, damp: float, damp_mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Hₛ of (1): the Hessian with the solvers' damping, in ``dtype``."""
    return damped(hessian.to(dtype), damp, damp_mode)[0]


def resolve_weights(dense: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, *,
                    damp: float, damp_mode: str = "relative", tol: float | None = None,
                    max_iter: int = RESOLVE_MAX_ITER,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """Exact least-squares weights of every row on its kept set (the minimum of (1) for mask ``keep``).

    Batched preconditioned conjugate gradients on P Hₛ P x = P Hₛ w (P = the row's mask), from ``start``.
    A row stops when an iteration lowers its objective (1) by less than ``tol`` of its current value (CG's
    exact decrease α·rᵀz; the objective, not the residual, is what the re-solve is for) or its relative
    residual falls below ``tol``.  ``dtype`` (default: float64 for float64 weights, else float32, as the
    solvers work) is that of the iterations; the guard is float64: rows whose result is not better than
    ``start`` on the undamped ``hessian`` keep ``start``.

    Returns:
        weights ``[rows, in]`` (zero off ``keep``, dtype of ``start``) and info (iterations, seconds, and
        ``resolve_loss``: ½·Σ_rows of (1) on the undamped ``hessian`` for the weights returned, in float64;
        ``row_objective``: (1) of every row, float64 ``[rows]``).
    """
    t0 = time.perf_counter()
    dtype = dtype or (torch.float64 if start.dtype == torch.float64 else torch.float32)
    tol = RESOLVE_TOL.get(dtype, 1e-6) if tol is None else tol
    tiny = torch.finfo(dtype).tiny
    hs = damped_curvature(hessian, damp, damp_mode, dtype)
    m = keep.to(dtype)
    w = dense.to(dtype)
    x = start.to(dtype) * m
    e = w - x
    g = linear(e, hs)                                                      # Hₛ is symmetric: e·Hₛᵀ = e·Hₛ
    f = (g * e).sum(1)                                                     # (1) per row, at the start
    r = g * m                                                              # P Hₛ (w − x) = b − A x
    dinv = 1.0 / torch.diagonal(hs).clamp_min(tiny)
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = (linear(w, hs) * m).norm(dim=1).clamp_min(tiny)
    active = torch.nonzero((r.norm(dim=1) > tol * bnorm) & (f > 0)).flatten()
    # The iterations work on the active rows only, gathered once and compacted when rows stop (not gathered
    # and scattered back every step: on the 768×3072 bench layer that copying cost ~8 % of the step).
    xa, ra, pa, ma = x[active], r[active], p[active], m[active]
    rza, fa, ba = rz[active], f[active], bnorm[active]
    za = torch.empty_like(ra)
    iters = 0
    # In place where it can be: on wide layers every [rows, in] temporary is a fresh mapping (page faults).
    while active.numel() and iters < max_iter:
        iters += 1
        ap = linear(pa, hs).mul_(ma)
        pap = torch.einsum("ij,ij->i", pa, ap)
        alpha = torch.where(pap > 0, rza / pap.clamp_min(tiny), torch.zeros_like(pap))
        xa.addcmul_(alpha.unsqueeze(1), pa)
        ra.addcmul_(alpha.unsqueeze(1), ap, value=-1.0)
        del ap
        decrease = alpha * rza                                             # exact fall of (1) this step
        fa -= decrease
        torch.mul(ra, dinv, out=za)
        rz_new = torch.einsum("ij,ij->i", ra, za)
        beta = torch.where(rza > 0, rz_new / rza.clamp_min(tiny), torch.zeros_like(rz_new))
        pa.mul_(beta.unsqueeze(1)).add_(za)
        rza = rz_new
        still = (torch.linalg.vector_norm(ra, dim=1) > tol * ba) & (decrease > tol * fa) & (pap > 0)
        if not bool(still.all()):
            done = ~still
            x[active[done]] = xa[done]
            active = active[still]
            xa, ra, pa, ma = (t[still] for t in (xa, ra, pa, ma))
            rza, fa, ba = rza[still], fa[still], ba[still]
            za = torch.empty_like(ra)
    x[active] = xa
    h = hessian.to(torch.float64)
    w64, x64, s64 = dense.double(), x.to(start.dtype).double(), start.double() * keep   # as returned
    f_new, f_start = row_objective(w64, x64, h), row_objective(w64, s64, h)
    better = f_new <= f_start
    out = torch.where(better.unsqueeze(1), x64, s64).to(start.dtype) * keep
    return out, dict(resolve_iterations=iters, resolve_rows_kept=int((~better).sum()),
                     resolve_loss=0.5 * float(torch.minimum(f_new, f_start).sum()),
                     resolve_seconds=time.perf_counter() - t0, row_objective=torch.minimum(f_new, f_start))


def better_rows(first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                second: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Combine two (weights, keep-mask, per-row objective) solutions of one layer row by row, never changing the
    layer's kept count: the better of the two whole solutions is the base, and every row whose kept count is the
    same in both (every row under N:M) takes the solution with the lower objective.  Rows are independent in
    the layer objective, so the result is at most the better whole solution's objective.  Returns weights,
    keep-mask, per-row objective and info (which whole solution was the base, how many rows came from the
    other)."""
    base_second = float(second[2].sum()) < float(first[2].sum())
    (w_a, k_a, f_a), (w_b, k_b, f_b) = (second, first) if base_second else (first, second)
    swap = (k_a.sum(1) == k_b.sum(1)) & (f_b < f_a)
    rows = swap.unsqueeze(1)
    return (torch.where(rows, w_b, w_a), torch.where(rows, k_b, k_a), torch.where(swap, f_b, f_a),
            dict(base="second" if base_second else "first", rows_from_other=int(swap.sum())))


def _blocks(cols: int, width: int, offset: int) -> list[tuple[int, int]]:
    edges = [0] + list(range(offset if offset else width, cols, width)) + [cols]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def refine_masks(dense: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
                 pattern: Pattern, prior: torch.Tensor | None, *, width: int, sweeps: int, damp: float,
                 damp_mode: str = "relative", backend: str = "auto",
                 reallocate: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Block re-search sweeps (2)–(3) over the layer; returns new weights, keep-mask and info.

    Args:
        dense: the original weights W ``[rows, in]``.
        weight, keep: the pruned weights and their mask (True = kept) to improve.
        hessian: the undamped input Hessian ``[in, in]``; the sweeps minimise (1) with the solvers' damping.
        pattern: N:M groups stay valid (a block re-searches each group with its own budget).
        prior: True where weights must stay pruned (removed first in every re-search), or None.
        width: columns per block (a multiple of M for N:M).
        sweeps: passes over the layer; odd passes shift the blocks by half a width.
        reallocate: unstructured only, also try re-spreading each block's removals over rows.
    """
    from cap_dist.solvers.cap import forced_prefix, greedy_kernels   # cap imports this module's siblings only

    t0 = time.perf_counter()
    rows, cols = weight.shape
    if pattern.structured and width % pattern.m:
        raise ValueError(f"refine_block={width} must be a multiple of M={pattern.m} for pattern {pattern}")
    search, replay, backend = greedy_kernels(backend, weight.device)
    dev = weight.device
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    hs = damped_curvature(hessian, damp, damp_mode, work)
    w_hat = (weight.to(work) * keep).clone()
    keep = keep.clone()
    g = (dense.to(work) - w_hat) @ hs                                      # G of (2)
    zeros_which = torch.zeros(rows, dtype=torch.long, device=dev)
    gained = 0.0
    moved = 0
    realloc_blocks = 0
    step = pattern.m if pattern.structured else 1
    for sweep in range(sweeps):
        offset = (width // 2) // step * step if sweep % 2 else 0
        for j0, j1 in _blocks(cols, width, offset):
            b = j1 - j0
            h_bb = hs[j0:j1, j0:j1]
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h_bb))
            hinv = 0.5 * (hinv + hinv.T)
            old = w_hat[:, j0:j1]
            target = old + g[:, j0:j1] @ hinv                              # (2)
            counts = (~keep[:, j0:j1]).sum(1)
            prefix = n_pre = None
            if prior is not None and bool(prior[:, j0:j1].any()):
                prefix, n_pre = forced_prefix(prior[:, j0:j1])
            if pattern.structured:
                depth = b // pattern.m * pattern.n_prune
                order, step_loss = search(target, hinv.unsqueeze(0), zeros_which, depth, pattern.m,
                                          pattern.n_prune, prefix=prefix, prefix_counts=n_pre)
            else:
                total = int(counts.sum())
                if total == 0:
                    continue
                mean_depth = math.ceil(total / rows)
                depth = min(b, max(int(counts.max()), mean_depth + (b - mean_depth) // 2) if reallocate
                            else int(counts.max()))
                order, step_loss = search(target, hinv.unsqueeze(0), zeros_which, depth, prefix=prefix,
                                          prefix_counts=n_pre)
            order, step_loss = order.to(dev), step_loss.to(dev)
            cands = [counts]
            if reallocate and not pattern.structured:
                key = step_loss
                if n_pre is not None:
                    forced = torch.arange(depth, device=dev).unsqueeze(0) < n_pre.to(dev).unsqueeze(1)
                    key = torch.where(forced, torch.full_like(step_loss, -math.inf), step_loss)
                cands.append(allocate_rows(key, int(counts.sum()), removal_order(key)))
            best = None
            for i, c in enumerate(cands):
                new = replay(target, hinv.unsqueeze(0), zeros_which, order, c).to(device=dev, dtype=work)
                taken = torch.arange(order.shape[1], device=dev).unsqueeze(0) < c.unsqueeze(1)
                new_keep = torch.ones(rows, b, dtype=torch.bool, device=dev)
                r_idx = torch.arange(rows, device=dev).unsqueeze(1).expand_as(order)[taken]
                new_keep[r_idx, order[taken]] = False
                new = new * new_keep
                d = old - new
                delta = 2 * (d * g[:, j0:j1]).sum(1) + ((d @ h_bb) * d).sum(1)     # (3)
                if i == 0:
                    take = delta < 0
                    gain = float(delta[take].sum())
                else:
                    take = torch.ones(rows, dtype=torch.bool, device=dev)
                    gain = float(delta.sum())
                if gain < 0 and (best is None or gain < best[0]):
                    best = (gain, take, new, new_keep, i)
            if best is None:
                continue
            gain, take, new, new_keep, i = best
            realloc_blocks += i
            d = torch.where(take.unsqueeze(1), old - new, torch.zeros_like(old))
            moved += int((new_keep[take] != keep[take, j0:j1]).sum()) // 2
            gained += gain
            w_hat[:, j0:j1] = torch.where(take.unsqueeze(1), new, old)
            keep[:, j0:j1] = torch.where(take.unsqueeze(1), new_keep, keep[:, j0:j1])
            g += d @ hs[j0:j1, :]                                          # E gains d on the block
    return w_hat.to(weight.dtype), keep, dict(refine_sweeps=sweeps, refine_block=width, refine_swaps=moved,
                                               refine_reallocated_blocks=realloc_blocks,
                                               refine_gain=-gained, refine_seconds=time.perf_counter() - t0)


ADMM_UPDATE_EVERY = 3
ADMM_RHO = 0.03
ADMM_GROWTH = (1.2, 1.1, 1.05)
"""ρ's growth every ADMM_UPDATE_EVERY iterations when >10 %, >0.5 % or less of the support moved: slower than ALPS's
(1.3, 1.2, 1.1), ~1.5× its iterations for better masks on every layer measured. Faster growth was tried on wide
layers to save iterations and lost there: on bench/peers.py's 1536×6144 loud layer at 70 % a faster one (1.5, 1.3,
1.1) ended at 1.43× ALPS's error, this one at 0.75×; on a second draw of that layer ALPS's own growth stopped after
51 iterations at 0.00883, this one after 84 at 0.00638. On vit4mnist's layers ALPS's growth left a 2:4 layer 0.1 %
above ALPS."""
FLIP_SPARSE_FRACTION = 64
"""flip_order takes a sparse product when at most 1/this of the entries differ between the two supports."""
ADMM_STOP = 3e-4
"""ADMM stops once fewer than this fraction of the pruned weights moved over the last ADMM_UPDATE_EVERY
iterations."""


def admm_uses_explicit_inverse(rows: int, cols: int) -> bool:
    """Whether ADMM's linear step multiplies by an explicit (Hₙ + ρI)⁻¹ (one [rows, in]·[in, in] product per
    iteration, plus a Cholesky factor and its inverse, ~in³, whenever ρ changes, every ADMM_UPDATE_EVERY
    iterations) rather than solving with the factor by blocks (:class:`~.products.SpdSolver`: about that
    product's flops, plus ~in³/2 to factor and build its block weights when ρ changes).  The inverse's
    rebuild is LAPACK's (no oneDNN route), so it pays only on narrow layers.  Measured (one thread, ADMM
    alone, 2026-12-04): explicit 0.26 / 0.15 s against 0.34 / 0.19 s on EfficientNet-Lite0's conv_head
    (1280×320) and conv_pw (1152×192); 0.35 against 0.37 s on conv_pwl (192×672); 15.9 against 8.5 s on the
    768×3072 layer."""
    return cols < ADMM_UPDATE_EVERY * rows


def admm_flops(rows: int, cols: int, iterations: int) -> float:
    """What ``iterations`` of :func:`admm_masks` cost: per iteration one product's worth of flops (a product, or
    the blocked solves) and, every ADMM_UPDATE_EVERY iterations, a new factor (and its inverse or block weights)."""
    product = 2.0 * rows * cols * cols
    rebuild = cols ** 3 if admm_uses_explicit_inverse(rows, cols) else cols ** 3 / 2.0
    return iterations * (product + rebuild / ADMM_UPDATE_EVERY) + rebuild


def resolve_flops(rows: int, cols: int, iterations: int = RESOLVE_TYPICAL_ITERATIONS) -> float:
    """What :func:`resolve_weights` costs: one [rows, in]·[in, in] product per conjugate-gradient step, and the
    float64 guard (two more, at about twice the float32 cost)."""
    return (iterations + 4) * 2.0 * rows * cols * cols


def flip_order(w0: torch.Tensor, b: torch.Tensor, hn: torch.Tensor, first: torch.Tensor,
               second: torch.Tensor) -> bool:
    """Whether B restricted to ``first`` has an objective ‖w₀ − B·K‖²_Hₙ at most that of B restricted to
    ``second``.

    With e = w₀ − B·K₁ and δ = B·(K₁ − K₂), the second objective is the first plus (2e + δ)·(δHₙ): the
    difference is computed directly, and δ is nonzero only where the supports differ (usually a few entries
    per row), so δHₙ costs a sparse product instead of two dense [rows, in]·[in, in] ones."""
    delta = b * (first.to(b.dtype) - second.to(b.dtype))
    nonzero = int(torch.count_nonzero(delta))
    if nonzero * FLIP_SPARSE_FRACTION <= delta.numel():
        dh = torch.sparse.mm(delta.to_sparse(), hn)
    else:
        dh = delta @ hn
    e = w0 - b * first
    return float((dh * e.mul_(2.0).add_(delta)).sum()) >= 0.0


def admm_masks(dense: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
               pattern: Pattern, prior: torch.Tensor | None, *, iterations: int, damp: float,
               damp_mode: str = "relative", rho: float = ADMM_RHO,
               inverse: str = "auto") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ADMM on the layer's mask, warm-started from a pruned solution (the mechanism of ALPS, Meng et al. 2024).

    In coordinates scaled to a unit-diagonal curvature (B = W·S, Hₙ = S⁻¹HₛS⁻¹, S = √diag Hₛ, so a
    weight's size is its output contribution), ADMM splits min ‖(W − B)‖²_Hₙ s.t. D sparse, B = D:
        B ← (Hₙ b₀ − V + ρD)(Hₙ + ρI)⁻¹,   Z = B + V/ρ,   D ← Π_sparse(Z),   V ← ρ(Z − D)
    (the last is V + ρ(B − D) written out; B is computed as b₀ + ρ(D − V/ρ − b₀)(Hₙ + ρI)⁻¹, as
    Hₙ(Hₙ + ρI)⁻¹ = I − ρ(Hₙ + ρI)⁻¹, with the scaled dual V/ρ: no product with Hₙ per iteration), with ρ
    raised while the support moves (ALPS's schedule, grown more slowly: :data:`ADMM_GROWTH`).  The linear step
    uses the Cholesky factor of Hₙ + ρI, computed again only when ρ changes: solves with it by blocks of
    products (:class:`~.products.SpdSolver`, oneDNN on the CPU: half the time of LAPACK's triangular solves
    there), or on layers with few inputs per output an explicit inverse from that factor
    (:func:`admm_uses_explicit_inverse`); no eigendecomposition (in float32 on the 768×3072 bench layer it cost
    as much as ~10 iterations, and the eigenbasis costs two products per iteration).  The iterations write
    into buffers allocated once.  The start is the given solution and its exact dual (D = B = ŵ, V = −Hₙ(ŵ − w)), a fixed point for large ρ, so ADMM
    only leaves it where a pruned weight's gradient is large against ρ.  ``inverse`` (``explicit``,
    ``cholesky``) forces either linear step (both are the same arithmetic up to rounding).  If the support still
    flips between two sets when ADMM stops, the one with the lower objective for B restricted to it is returned
    (:func:`flip_order`), and the other (mask, weights) is in ``info["admm_alternative"]``: B restricted to a
    support is not its optimum, so a caller that re-solves should re-solve both and keep the lower (a
    projection's objective can rank them the wrong way round).  Returns weights (B projected on the final
    support, to be re-solved), the keep-mask (the layer's exact count, N:M groups, prior zeros kept) and info.
    """
    t0 = time.perf_counter()
    rows, cols = weight.shape
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    hs = damped_curvature(hessian, damp, damp_mode, work)
    s = torch.diagonal(hs).clamp_min(torch.finfo(work).tiny).sqrt()
    hn = hs / s.unsqueeze(0) / s.unsqueeze(1)
    if inverse not in ("auto", "explicit", "cholesky"):
        raise ValueError(f"inverse={inverse!r} must be 'auto', 'explicit' or 'cholesky'")
    mode = ("explicit" if admm_uses_explicit_inverse(rows, cols) else "cholesky") if inverse == "auto" else inverse

    w0 = dense.to(work) * s
    d = weight.to(work) * keep * s
    u = linear(w0 - d, hn).div_(rho)                             # the exact dual V = Hₙ(w₀ − ŵ), as U = V/ρ
    count = int((~keep).sum())
    mask = keep.clone()
    factor_rho, factor = None, None

    shifted = torch.empty_like(hn)

    def solve_(rhs: torch.Tensor, r: float) -> torch.Tensor:         # rhs ← rhs (Hₙ + rI)⁻¹
        nonlocal factor_rho, factor
        if factor_rho != r:                                  # Hₙ + rI = LLᵀ (or its inverse), once per ρ
            shifted.copy_(hn).diagonal().add_(r)
            if mode == "explicit":
                lower, info = blocked_cholesky(shifted)
            else:
                factor, info = SpdSolver.factor(shifted, reuse=factor)
            if info:
                raise ValueError(f"ADMM: the scaled curvature plus {r:g}·I is not positive definite (leading minor "
                                 f"{info}): the Hessian is not positive semidefinite; check the calibration data")
            factor_rho = r
            if mode == "explicit":
                factor = torch.cholesky_inverse(lower)
        if mode == "explicit":
            return rhs.copy_(linear(rhs, factor))                          # the inverse is symmetric
        return factor.solve_(rhs)

    growth = ADMM_GROWTH
    # The iterations write into buffers allocated once: a [rows, in] temporary per operation would be a fresh
    # mapping each time on wide layers (38 MB at 1536×6144: past malloc's reuse threshold), and the page faults
    # cost ~0.3 s of system time per iteration there.
    b = torch.empty_like(w0)
    z = torch.empty_like(w0)
    scores = torch.empty_like(w0)
    b.copy_(d)
    new_mask = last_mask = keep
    it = -1
    for it in range(iterations):
        last_mask = new_mask
        torch.sub(d, u, out=b).sub_(w0)
        solve_(b, rho).mul_(rho).add_(w0)                                  # B = (Hₙw₀ − V + ρD)(Hₙ + ρI)⁻¹
        torch.add(b, u, out=z)
        torch.square(z, out=scores)
        if prior is not None:
            scores.masked_fill_(prior, -math.inf)
        if pattern.structured:
            new_mask = n_m_mask(scores, pattern)
        else:
            new_mask, _ = threshold_keep(scores, count)
        torch.mul(z, new_mask, out=d)
        torch.sub(z, d, out=u)                                             # V/ρ = Z − D
        if (it + 1) % ADMM_UPDATE_EVERY == 0:
            change = int(torch.count_nonzero(new_mask != mask)) / max(1, 2 * count)
            grow = growth[0] if change > 0.1 else growth[1] if change > 0.005 else growth[2]
            rho *= grow
            u.div_(grow)                                          # V is kept; U = V/ρ follows ρ
            mask = new_mask
            if change < ADMM_STOP and it >= 2 * ADMM_UPDATE_EVERY:
                break
    del z, scores
    mask, other = new_mask, None
    if not torch.equal(last_mask, new_mask):          # the support flips between two sets: keep the better
        first = flip_order(w0, b, hn, new_mask, last_mask)
        mask, other = (new_mask, last_mask) if first else (last_mask, new_mask)
    out = (b * mask / s).to(weight.dtype)
    info = dict(admm_iterations=it + 1, admm_rho=rho, admm_inverse=mode,
                admm_moved=int((mask != keep).sum()) // 2, admm_seconds=time.perf_counter() - t0)
    if other is not None:
        info["admm_alternative"] = (other, (b * other / s).to(weight.dtype))
    return out, mask, info
