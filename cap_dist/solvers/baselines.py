"""Baseline pruners with CAP's interface: magnitude, Wanda, one-shot OBS (WoodFisher/oBERT), SparseGPT.

Each returns the fields of a LayerResult (weight, mask, losses, info); ``prune_layer`` adds the
exact loss and energy.  ``losses`` holds each method's own saliency at the pruned positions.
"""

from __future__ import annotations

import torch

from cap_dist.solvers.numerics import cholesky_inverse_escalating, inverse_factor
from cap_dist.solvers.patterns import Pattern, lowest_k_mask, n_m_mask, prune_count


def _per_row_counts(rows: int, total: int, device: torch.device) -> torch.Tensor:
    """Split ``total`` removals as evenly as possible over rows (first rows take the remainder)."""
    counts = torch.full((rows,), total // rows, dtype=torch.long, device=device)
    counts[: total % rows] += 1
    return counts


def _lowest_counts_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks >= counts.unsqueeze(1)


def _select(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool,
            prior: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask from scores; ``prior`` (True = already pruned) positions score -inf, so they go first (a
    row that already holds more than its share keeps all of its zeros and removes nothing else)."""
    if prior is not None:
        scores = torch.where(prior, torch.full_like(scores, -torch.inf), scores)
    if pattern.structured:
        return n_m_mask(scores, pattern)
    total = prune_count(scores.numel(), sparsity)
    if per_row:
        counts = _per_row_counts(scores.shape[0], total, scores.device)
        if prior is not None:
            counts = torch.maximum(counts, prior.sum(1))
        return _lowest_counts_per_row(scores, counts)
    return lowest_k_mask(scores, max(total, int(prior.sum())) if prior is not None else total)


def _result(weight: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor, info: dict) -> dict:
    return dict(weight=weight * keep, mask=keep, losses=torch.where(keep, torch.zeros_like(scores), scores),
                curve=None, info=info)


def magnitude(weight: torch.Tensor, sparsity: float, pattern: Pattern, prior: torch.Tensor | None = None) -> dict:
    """Remove the smallest |w| of the layer (per group of M for N:M)."""
    scores = weight.abs().float()
    return _result(weight, _select(scores, sparsity, pattern, per_row=False, prior=prior), scores, {})


def wanda(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
          prior: torch.Tensor | None = None) -> dict:
    """Wanda (Sun et al. 2023): score |w_ij|·‖x_j‖, compared within each output row, no update.

    ‖x_j‖ ∝ √H_jj for H = 2/N XXᵀ (the constant factor does not change the order).
    """
    if hessian.ndim != 2:
        raise ValueError("wanda needs input-activation curvature (an [in, in] Hessian), not Fisher blocks")
    scores = weight.abs().float() * torch.sqrt(torch.diagonal(hessian).float().clamp_min(0)).unsqueeze(0)
    return _result(weight, _select(scores, sparsity, pattern, per_row=True, prior=prior), scores, {})


def obs_oneshot(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
                damp: float, prior: torch.Tensor | None = None, damp_mode: str = "relative") -> dict:
    """One-shot OBS (WoodFisher / oBERT): score every weight once against the dense H⁻¹,
    ρ_p = w_p² / (2[H⁻¹]_pp), remove the lowest, and apply the *summed* single-weight updates
        δw = −Σ_{p∈P} (w_p / [H⁻¹]_pp) · H⁻¹[:, p],
    which ignores the correlations between removed weights (what CAP fixes).

    ``damp_mode="mean"``: upstream SparseGPT's damping and its handling of dead inputs (their weights are
    zeroed first: they never reach the output), the convention of the OBS-family code it grew from."""
    work = weight.dtype if weight.dtype == torch.float64 else torch.float32
    fac = cholesky_inverse_escalating(hessian, damp, work_dtype=work, mode=damp_mode)
    hinv = fac.inverse
    w = _zero_dead(weight.to(work), hessian, damp_mode)
    if hessian.ndim == 3:                                           # Fisher blocks, each with its own H⁻¹
        n_blocks, width, _ = hinv.shape
        flat = w.reshape(n_blocks, width)
        diag = torch.diagonal(hinv, dim1=1, dim2=2)
        scores = (flat * flat / (2 * diag)).reshape(w.shape)
        keep = _select(scores, sparsity, pattern, per_row=False, prior=prior)
        pruned = (~keep).reshape(n_blocks, width).to(work)
        delta = -torch.einsum("bp,bpq->bq", pruned * flat / diag, hinv).reshape(w.shape)
    else:
        diag = torch.diagonal(hinv)
        scores = w * w / (2 * diag.unsqueeze(0))
        keep = _select(scores, sparsity, pattern, per_row=False, prior=prior)
        delta = -((~keep).to(work) * w / diag.unsqueeze(0)) @ hinv
    info = dict(damp_used=fac.damp_used, escalations=fac.escalations, dead_inputs=fac.dead_inputs)
    return _result(w + delta, keep, scores, info)


def _zero_dead(w: torch.Tensor, hessian: torch.Tensor, damp_mode: str) -> torch.Tensor:
    """Upstream SparseGPT's ``W[:, dead] = 0`` (``damp_mode="mean"`` only; the default leaves W as given)."""
    if damp_mode != "mean" or hessian.ndim != 2:
        return w
    dead = torch.diagonal(hessian) == 0
    if not bool(dead.any()):
        return w
    w = w.clone()
    w[:, dead] = 0.0
    return w


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern, damp: float,
              block_size: int = 128, prior: torch.Tensor | None = None, damp_mode: str = "relative") -> dict:
    """SparseGPT (Frantar & Alistarh 2023): one left-to-right column sweep with U = chol(H⁻¹)ᵀ.

    Masks are chosen per block of ``block_size`` columns from w² / U_jj² (the block's exact share
    of the layer target, over all rows; N:M per group as the sweep reaches it).  Column j is then
    fixed and its error err = (w_j − q_j)/U_jj is carried to the rest of the block at once and to
    later blocks lazily:  W[:, later] −= Err · U[block, later].

    ``damp_mode="mean"`` is upstream's ``fasterprune`` numerics: dead inputs get H_ii = 1 and zero weights, and
    λ = damp·mean(diag H) is added to every input (``damp=0.01`` is upstream's ``percdamp``).
    """
    if hessian.ndim != 2:
        raise ValueError("sparsegpt needs input-activation curvature (an [in, in] Hessian), not Fisher blocks")
    rows, cols = weight.shape
    work = weight.dtype if weight.dtype == torch.float64 else torch.float32
    u, fac = inverse_factor(hessian, damp, work, damp_mode)                # UᵀU = H⁻¹
    w = _zero_dead(weight.to(work), hessian, damp_mode).clone()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    losses = torch.zeros(rows, cols, dtype=work, device=weight.device)
    removed = 0
    for j0 in range(0, cols, block_size):
        j1 = min(j0 + block_size, cols)
        w1 = w[:, j0:j1].clone()
        u1 = u[j0:j1, j0:j1]
        d1 = torch.diagonal(u1)
        err = torch.zeros_like(w1)
        prior1 = prior[:, j0:j1] if prior is not None else None
        if pattern.structured:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        else:
            share = prune_count(rows * j1, sparsity) - removed
            scores = w1 * w1 / (d1 * d1).unsqueeze(0)
            if prior1 is not None:                                  # earlier masks go first
                share = max(share, int(prior1.sum()))
                scores = torch.where(prior1, torch.full_like(scores, -torch.inf), scores)
            keep1 = lowest_k_mask(scores, share)
            removed += share
        for i in range(j1 - j0):
            if pattern.structured and i % pattern.m == 0:
                group = w1[:, i:i + pattern.m] ** 2 / (d1[i:i + pattern.m] ** 2).unsqueeze(0)
                if prior1 is not None:
                    group = torch.where(prior1[:, i:i + pattern.m], torch.full_like(group, -torch.inf), group)
                keep1[:, i:i + pattern.m] = n_m_mask(group, pattern)
            col = w1[:, i]
            q = col * keep1[:, i]
            losses[:, j0 + i] = (col - q) ** 2 / (2 * d1[i] ** 2)
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, j0:j1] = w1
        keep[:, j0:j1] = keep1
        w[:, j1:] -= err @ u[j0:j1, j1:]
    info = dict(damp_used=fac.damp_used, escalations=fac.escalations, dead_inputs=fac.dead_inputs,
                block_size=block_size)
    return dict(weight=w * keep, mask=keep, losses=losses * ~keep, curve=None, info=info)
