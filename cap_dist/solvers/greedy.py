"""The inner loop of CAP: exact greedy OBS elimination on small blocks, batched over rows.

For one row w (length B) and an inverse Hessian H⁻¹ (B×B), every step removes the weight
    p = argmin_i  w_i² / [H⁻¹]_ii                      (OBS saliency)
with loss  ½ w_p² / [H⁻¹]_pp, applies the exact OBS update to all remaining weights
    w ← w − (w_p / [H⁻¹]_pp) · H⁻¹[:, p]
and downdates the inverse (eliminating row/column p):
    H⁻¹ ← H⁻¹ − H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp.
Correlations between removed weights are therefore accounted for at every step, unlike
one-shot saliency (WoodFisher/oBERT), which scores every weight against the dense H⁻¹.

Two interchangeable kernels:
* :func:`greedy_numba` (CPU): one row per thread; the downdated inverse is kept implicitly as
  H⁻¹ − Σ_t c_t c_tᵀ (c_t = the column removed at step t, scaled by 1/√d_t), so a step costs
  O(t·B) instead of O(B²) and the working set (depth × B) stays in cache.
* :func:`greedy_torch` (any device, the CUDA path): the plain batched downdate of [R, B, B].

Both return the removal order and per-step losses; with ``forced`` they replay a recorded order
to a per-row depth (CAP chooses the depth of every row only after all rows have been searched)
and return the final weights.  A search may start with a given prefix per row (``prefix`` /
``prefix_counts``: weights that must go first, e.g. those pruned at an earlier step of gradual
pruning); they are removed with the same exact OBS updates, then the greedy continues.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True, nogil=True)
def _greedy_kernel(weights, hinv, which, depth, group, group_prune, order, step_loss, counts, forced, out,
                   prefix_counts):
    rows, width = weights.shape
    for r in numba.prange(rows):
        h = hinv[which[r]]
        w = weights[r].copy()
        diag = np.empty(width, dtype=weights.dtype)
        for i in range(width):
            diag[i] = h[i, i]
        removed = np.zeros((depth, width), dtype=weights.dtype)   # c_t / sqrt(d_t)
        # +inf once a weight is removed or its N:M group is full: its score can no longer be the minimum.
        barred = np.zeros(width, dtype=weights.dtype)
        score = np.empty(width, dtype=weights.dtype)
        n_groups = width // group if group > 0 else 1
        budget = np.full(n_groups, group_prune, dtype=np.int64)
        steps = counts[r] if forced else depth
        if not forced:
            for i in range(width):
                score[i] = w[i] * w[i] / diag[i]
        c = np.empty(width, dtype=weights.dtype)
        for t in range(steps):
            if forced or t < prefix_counts[r]:
                p = order[r, t]
            else:
                best = np.inf
                p = -1
                for i in range(width):       # scores are kept current by the update below: a plain scan
                    if score[i] < best:
                        best = score[i]
                        p = i
                if p < 0:                    # every allowed score is inf or NaN (degenerate curvature)
                    for i in range(width):
                        if barred[i] == 0.0:
                            p = i
                            break
                order[r, t] = p
            # column p of the downdated inverse: H⁻¹[:, p] − Σ_s removed_s · removed_s[p], four terms per pass
            # over c (one load and store of c per four products instead of per product)
            for i in range(width):
                c[i] = h[p, i]
            s = 0
            while s + 4 <= t:
                f0, f1, f2, f3 = removed[s, p], removed[s + 1, p], removed[s + 2, p], removed[s + 3, p]
                r0, r1, r2, r3 = removed[s], removed[s + 1], removed[s + 2], removed[s + 3]
                for i in range(width):
                    c[i] -= (f0 * r0[i] + f1 * r1[i]) + (f2 * r2[i] + f3 * r3[i])
                s += 4
            while s < t:
                f = removed[s, p]
                rs = removed[s]
                for i in range(width):
                    c[i] -= f * rs[i]
                s += 1
            d = c[p]
            coef = w[p] / d
            if not forced:
                step_loss[r, t] = 0.5 * w[p] * coef
            scale = 1.0 / math.sqrt(d)
            for i in range(width):
                w[i] -= coef * c[i]
                removed[t, i] = c[i] * scale
                diag[i] -= c[i] * c[i] / d
            w[p] = 0.0
            barred[p] = np.inf
            if group > 0:
                g = p // group
                budget[g] -= 1
                if budget[g] == 0:
                    for i in range(g * group, (g + 1) * group):
                        barred[i] = np.inf
            if not forced:
                for i in range(width):
                    score[i] = w[i] * w[i] / diag[i] + barred[i]
        if forced:
            for i in range(width):
                out[r, i] = w[i]


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


@contextlib.contextmanager
def torch_threads():
    """Run a numba kernel on torch's thread count, and put torch's OpenMP setting back afterwards.

    numba's ``omp`` threading layer shares the OpenMP runtime with torch: a parallel kernel left OpenMP at
    numba's thread count (every core), so torch's next operations ran multi-threaded behind a
    ``torch.set_num_threads(1)`` — on a loaded 2-core machine the polish after the greedy (ADMM, re-solve)
    ran its element-wise steps 10-20× slower, and a one-thread benchmark was not one thread."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy_numba(weights: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, depth: int,
                 group: int = 0, group_prune: int = 0, prefix: torch.Tensor | None = None,
                 prefix_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS search of every row to ``depth`` removals (CPU, compiled).

    Args:
        weights: ``[R, B]`` rows to search.
        hinv: ``[S, B, B]`` inverse Hessians; row r uses ``hinv[which[r]]``.
        which: ``[R]`` index into ``hinv``.
        depth: removals per row.
        group, group_prune: N:M — at most ``group_prune`` removals in every ``group`` consecutive
            weights (``group=0``: unstructured).
        prefix, prefix_counts: row r first removes ``prefix[r, :prefix_counts[r]]`` (``[R, ≥max count]``
            int64 and ``[R]``), in that order, then continues greedily.

    Returns:
        order ``[R, depth]`` (int64) and step losses ``[R, depth]``.
    """
    w = _as_numpy(weights)
    rows = w.shape[0]
    order, pre = _prefix_arrays(rows, depth, prefix, prefix_counts)
    step = np.zeros((rows, depth), dtype=w.dtype)
    counts = np.zeros(rows, dtype=np.int64)
    with torch_threads():
        _greedy_kernel(w, _as_numpy(hinv.to(weights.dtype)), _as_numpy(which.long()), depth, group, group_prune,
                       order, step, counts, False, np.empty((1, 1), dtype=w.dtype), pre)
    return torch.from_numpy(order), torch.from_numpy(step)


def _prefix_arrays(rows: int, depth: int, prefix: torch.Tensor | None,
                   prefix_counts: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's order buffer pre-filled with the forced prefixes, and their lengths."""
    order = np.zeros((rows, depth), dtype=np.int64)
    if prefix is None:
        return order, np.zeros(rows, dtype=np.int64)
    pre = _as_numpy(prefix_counts.long()).copy()
    if pre.size and int(pre.max()) > depth:
        raise ValueError(f"a row must first remove {int(pre.max())} weights but the search depth is {depth}")
    width = min(depth, prefix.shape[1])
    order[:, :width] = _as_numpy(prefix.long())[:, :width]
    return order, pre


def replay_numba(weights: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, order: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
    """Final weights after removing the first ``counts[r]`` weights of ``order[r]`` (exact OBS updates)."""
    w = _as_numpy(weights)
    out = np.empty_like(w)
    with torch_threads():
        _greedy_kernel(w, _as_numpy(hinv.to(weights.dtype)), _as_numpy(which.long()), order.shape[1], 0, 0,
                       _as_numpy(order.long()), np.empty((1, 1), dtype=w.dtype), _as_numpy(counts.long()), True,
                       out, np.zeros(w.shape[0], dtype=np.int64))
    return torch.from_numpy(out)


def _torch_steps(weights: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, depth: int, group: int,
                 group_prune: int, order: torch.Tensor | None, counts: torch.Tensor | None,
                 prefix: torch.Tensor | None = None, prefix_counts: torch.Tensor | None = None):
    rows, width = weights.shape
    h = hinv[which].clone()                                   # [R, B, B]
    w = weights.clone()                                       # [R, B]
    alive = torch.ones_like(w, dtype=torch.bool)
    idx = torch.arange(rows, device=w.device)
    forced = order is not None
    out_order = torch.zeros(rows, depth, dtype=torch.long, device=w.device)
    out_loss = torch.zeros(rows, depth, dtype=w.dtype, device=w.device)
    budget = (torch.full((rows, width // group), group_prune, device=w.device, dtype=torch.long)
              if group else None)
    for t in range(depth):
        diag = torch.diagonal(h, dim1=1, dim2=2)
        if forced:
            p = order[:, t]
            active = t < counts
        else:
            allowed = alive if budget is None else alive & (budget.repeat_interleave(group, dim=1) > 0)
            score = torch.where(allowed, w * w / torch.where(allowed, diag, torch.ones_like(diag)),
                                torch.full_like(w, math.inf))
            p = torch.argmin(score, dim=1)
            if prefix is not None and t < prefix.shape[1]:
                p = torch.where(t < prefix_counts, prefix[:, t], p)
            active = torch.ones(rows, dtype=torch.bool, device=w.device)
        d = diag[idx, p]
        d = torch.where(active, d, torch.ones_like(d))
        c = h[idx, :, p] * active.unsqueeze(1)                # [R, B]
        wp = w[idx, p]
        coef = torch.where(active, wp / d, torch.zeros_like(d))
        out_order[:, t] = p
        out_loss[:, t] = 0.5 * wp * coef
        w -= coef.unsqueeze(1) * c
        h -= c.unsqueeze(2) * (c / d.unsqueeze(1)).unsqueeze(1)
        w[idx[active], p[active]] = 0.0
        alive[idx[active], p[active]] = False
        if budget is not None:
            budget[idx, p // group] -= active.long()
    return out_order, out_loss, w


def _row_chunks(rows: int, width: int, itemsize: int, budget_bytes: int = 256 << 20) -> int:
    return max(1, min(rows, budget_bytes // max(1, width * width * itemsize)))


def greedy_torch(weights: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, depth: int,
                 group: int = 0, group_prune: int = 0, prefix: torch.Tensor | None = None,
                 prefix_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`greedy_numba`, batched in torch (rows chunked to bound memory)."""
    if prefix is not None and prefix_counts.numel() and int(prefix_counts.max()) > depth:
        raise ValueError(f"a row must first remove {int(prefix_counts.max())} weights but the search depth is "
                         f"{depth}")
    chunk = _row_chunks(*weights.shape, weights.element_size())
    parts = [_torch_steps(weights[i:i + chunk], hinv, which[i:i + chunk], depth, group, group_prune, None, None,
                          None if prefix is None else prefix[i:i + chunk].to(weights.device),
                          None if prefix is None else prefix_counts[i:i + chunk].to(weights.device))
             for i in range(0, weights.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def replay_torch(weights: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, order: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`replay_numba`, batched in torch."""
    chunk = _row_chunks(*weights.shape, weights.element_size())
    depth = int(counts.max()) if counts.numel() else 0
    return torch.cat([_torch_steps(weights[i:i + chunk], hinv, which[i:i + chunk], depth, 0, 0,
                                   order[i:i + chunk], counts[i:i + chunk])[2]
                      for i in range(0, weights.shape[0], chunk)])
