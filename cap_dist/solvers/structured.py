"""Structured OBS: remove whole groups of a consumer layer's input columns with exact updates of the rest.

A group is the set of input columns of a consumer layer that one structure feeds: one hidden unit of an MLP
(one column of ``fc2``), one attention head (``head_dim`` columns of ``proj``), one expansion channel of an inverted
residual (one input channel of ``conv_pwl``). Removing the structure zeroes those columns (the producer's rows
go with them and cost nothing more: they only fed these columns), so the layer problem is the group form of OBS.

The objective per layer, with H = 2/N Σ x xᵀ (what :class:`~cap_dist.solvers.HessianAccumulator` collects), is
L(Ŵ) = ½·tr((Ŵ−W) H (Ŵ−W)ᵀ) = ‖(Ŵ−W)X‖²/N. Removing group g (columns g, size k) from the current
weight W with the inverse curvature Hinv = H⁻¹ (restricted to the columns still present) is, row by row, a
quadratic program with the constraint δ_g = −w_g; its solution and cost are the group OBS of oBERT (Kurtic et
al., 2022):

    δ = −W[:,g] (Hinv[g,g])⁻¹ Hinv[g,:]                     # W ← W + δ  (columns g become exactly 0)
    ΔL = ½·tr(W[:,g] (Hinv[g,g])⁻¹ W[:,g]ᵀ)                 # summed over the rows
    Hinv ← Hinv − Hinv[:,g] (Hinv[g,g])⁻¹ Hinv[g,:]          # the inverse of H with columns g removed

The greedy (:func:`greedy_group_obs`, CAP's correlation-aware form) rescores every remaining group after each
removal with the downdated inverse; :func:`oneshot_group_scores` scores every group once against the dense
model (WoodFisher/oBERT style), :func:`magnitude_group_scores` by the group's L2 norm. Whatever chose the groups,
:func:`solve_kept_columns` gives the least-squares optimum of the kept columns; after the greedy it equals the
greedy's own weights (the sequence of exact updates is the projection onto the kept columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cap_dist.solvers.numerics import cholesky_inverse_escalating, damped

GROUP_METHODS = ("cap", "obs", "magnitude")


@dataclass
class GroupPruneResult:
    """One layer's structured prune.

    Attributes:
        order: group ids in removal order, ``[count]``.
        losses: the loss of each removal, ``[count]``: for ``cap`` the exact increase of ½·tr(δ H δᵀ) at that step
            (their cumulative sum is the layer's loss after each step); for the baselines their selection score.
        weight: ``[out, in]`` after removing ``order`` (removed columns exactly 0), float64.
        kept: group ids kept, ascending.
    """

    order: torch.Tensor
    losses: torch.Tensor
    weight: torch.Tensor
    kept: torch.Tensor


def contiguous_groups(n_groups: int, group_size: int, offset: int = 0) -> torch.Tensor:
    """``[n_groups, group_size]`` column ids of equal contiguous groups (heads of ``group_size`` columns)."""
    if n_groups < 1 or group_size < 1:
        raise ValueError(f"groups need n_groups >= 1 and group_size >= 1, got {n_groups} and {group_size}")
    return torch.arange(offset, offset + n_groups * group_size).reshape(n_groups, group_size)


def check_groups(groups: torch.Tensor, columns: int) -> None:
    if groups.ndim != 2 or groups.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"groups must be an integer tensor [n_groups, group_size], got {groups.dtype} "
                         f"{tuple(groups.shape)}")
    flat = groups.reshape(-1)
    if int(flat.min()) < 0 or int(flat.max()) >= columns:
        raise ValueError(f"group column ids must lie in [0, {columns}); got [{int(flat.min())}, {int(flat.max())}]")
    if flat.unique().numel() != flat.numel():
        raise ValueError("groups overlap: every input column may belong to one group at most")


def damped_inverse(hessian: torch.Tensor, damp: float, damp_mode: str = "relative") -> torch.Tensor:
    """(damped H)⁻¹ in float64 (the damping of the unstructured solvers, escalated if Cholesky fails)."""
    return cholesky_inverse_escalating(hessian.double(), damp, work_dtype=torch.float64, mode=damp_mode).inverse


def _group_blocks(weight: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinv[g,g] for every group, [G, k, k], and W[:,g]ᵀ, [G, k, out]."""
    blocks = hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)]            # [G, k, k]
    wg = weight[:, groups].permute(1, 2, 0)                               # [G, k, out]
    return blocks, wg


def oneshot_group_scores(weight: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ΔL_g = ½·tr(W[:,g] (Hinv[g,g])⁻¹ W[:,g]ᵀ) of removing each group alone from ``weight``, ``[G]``."""
    if groups.shape[1] == 1:                                              # single columns: w_j² / Hinv_jj
        cols = groups[:, 0]
        return 0.5 * weight[:, cols].pow(2).sum(0) / torch.diagonal(hinv)[cols]
    blocks, wg = _group_blocks(weight, hinv, groups)
    solved = torch.linalg.solve(blocks, wg)                               # (Hinv[g,g])⁻¹ W[:,g]ᵀ
    return 0.5 * (wg * solved).sum(dim=(1, 2))


def magnitude_group_scores(weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """‖W[:,g]‖_F of each group, ``[G]`` (the structured magnitude baseline)."""
    return weight[:, groups].pow(2).sum(dim=(0, 2)).sqrt()


def remove_group(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """Remove the columns ``cols`` from ``weight`` with the exact OBS update and downdate ``hinv``, in place.

    Returns the step's loss ½·tr(W[:,g] (Hinv[g,g])⁻¹ W[:,g]ᵀ)."""
    rows = hinv[cols, :]                                                  # Hinv[g,:], [k, in]
    wg = weight[:, cols]                                                  # [out, k]
    if cols.numel() == 1:                                                 # one column: the scalar OBS step
        pivot = rows[0, cols[0]]
        loss = 0.5 * float(wg.pow(2).sum() / pivot)
        weight.addr_(wg[:, 0], rows[0], alpha=-1.0 / float(pivot))
        hinv.addr_(rows[0], rows[0], alpha=-1.0 / float(pivot))
    else:
        block = hinv[cols.unsqueeze(-1), cols.unsqueeze(0)]               # [k, k]
        coef = torch.linalg.solve(block, wg.T)                            # (Hinv[g,g])⁻¹ W[:,g]ᵀ, [k, out]
        loss = 0.5 * float((wg.T * coef).sum())
        weight.addmm_(coef.T, rows, alpha=-1.0)                           # W ← W − W[:,g](Hinv[g,g])⁻¹Hinv[g,:]
        hinv.addmm_(rows.T, torch.linalg.solve(block, rows), alpha=-1.0)  # Hinv −= Hinv[:,g](..)⁻¹Hinv[g,:]
    weight[:, cols] = 0.0                                                 # exact zeros (rounding leaves ~1e-17)
    hinv[cols, :] = 0.0
    hinv[:, cols] = 0.0
    return loss


def greedy_group_obs(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, count: int, *,
                     damp: float = 0.01, damp_mode: str = "relative") -> GroupPruneResult:
    """Remove ``count`` groups one at a time, each the cheapest under the current (downdated) inverse curvature.

    Args:
        weight: ``[out, in]`` consumer weight (a 1×1 conv flattened).
        hessian: ``[in, in]`` its input Hessian, undamped (damped here as the unstructured solvers do).
        groups: ``[G, k]`` column ids of each group.
        count: how many groups to remove, ``0 <= count < G`` (at least one group stays).
    """
    check_groups(groups, weight.shape[1])
    _check_count(count, groups.shape[0])
    w = weight.detach().double().clone()
    hinv = damped_inverse(hessian, damp, damp_mode)
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    order, losses = [], []
    for _ in range(count):
        ids = alive.nonzero().squeeze(1)
        scores = oneshot_group_scores(w, hinv, groups[ids])
        best = int(ids[int(torch.argmin(scores))])
        losses.append(remove_group(w, hinv, groups[best]))
        order.append(best)
        alive[best] = False
    return GroupPruneResult(torch.tensor(order, dtype=torch.long), torch.tensor(losses, dtype=torch.float64), w,
                            alive.nonzero().squeeze(1))


def greedy_loss_curve(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, depth: int, *,
                      damp: float = 0.01, damp_mode: str = "relative") -> torch.Tensor:
    """Cumulative loss after 0..depth greedy removals, ``[depth + 1]`` (what the global allocation needs)."""
    res = greedy_group_obs(weight, hessian, groups, depth, damp=damp, damp_mode=damp_mode)
    return torch.cat([torch.zeros(1, dtype=torch.float64), res.losses.cumsum(0)])


def solve_kept_columns(weight: torch.Tensor, hessian: torch.Tensor, removed: torch.Tensor, *,
                       damp: float = 0.01, damp_mode: str = "relative") -> torch.Tensor:
    """The least-squares optimum with the columns ``removed`` fixed at 0: argmin ½·tr(δ H δᵀ) over Ŵ = W + δ.

    With K the kept columns, Ŵ[:,K] = W H[:,K] (H[K,K])⁻¹ on the damped H (the greedy's curvature), float64."""
    w = weight.detach().double()
    h = damped_hessian(hessian, damp, damp_mode)
    mask = torch.ones(w.shape[1], dtype=torch.bool)
    mask[removed] = False
    keep = mask.nonzero().squeeze(1)
    out = torch.zeros_like(w)
    rhs = (w @ h[:, keep]).T                                              # [K, out]
    out[:, keep] = torch.linalg.solve(h[keep][:, keep], rhs).T
    return out


def damped_hessian(hessian: torch.Tensor, damp: float, damp_mode: str = "relative") -> torch.Tensor:
    """The damped H whose inverse :func:`damped_inverse` returns (same escalation)."""
    fac = cholesky_inverse_escalating(hessian.double(), damp, work_dtype=torch.float64, mode=damp_mode)
    return damped(hessian.double(), fac.damp_used, damp_mode)[0]


def group_loss(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """½·tr((Ŵ−W) H (Ŵ−W)ᵀ) in float64: the layer's loss of a structured prune (pass the undamped H)."""
    delta = pruned.double() - weight.double()
    return 0.5 * float(((delta @ hessian.double()) * delta).sum())


def prune_groups(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, count: int, method: str, *,
                 damp: float = 0.01, damp_mode: str = "relative") -> GroupPruneResult:
    """Remove ``count`` groups chosen by ``method``; the remaining weights are the least-squares optimum.

    ``cap``: the exact greedy with downdates (its weights are already that optimum). ``obs``: the ``count`` lowest
    one-shot OBS scores against the dense weights (no downdates). ``magnitude``: the lowest group L2 norms. The
    baselines get the same exact re-solve of the kept columns, so the comparison is of the choice of groups alone.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"structured method {method!r} is not one of {', '.join(GROUP_METHODS)}")
    check_groups(groups, weight.shape[1])
    _check_count(count, groups.shape[0])
    if method == "cap":
        return greedy_group_obs(weight, hessian, groups, count, damp=damp, damp_mode=damp_mode)
    w = weight.detach().double()
    if method == "obs":
        scores = oneshot_group_scores(w, damped_inverse(hessian, damp, damp_mode), groups)
    else:
        scores = magnitude_group_scores(w, groups)
    order = torch.argsort(scores, stable=True)[:count]
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    alive[order] = False
    pruned = solve_kept_columns(w, hessian, groups[order].reshape(-1), damp=damp, damp_mode=damp_mode)
    return GroupPruneResult(order, scores[order], pruned, alive.nonzero().squeeze(1))


def _check_count(count: int, n_groups: int) -> None:
    if not 0 <= count < n_groups:
        raise ValueError(f"cannot remove {count} of {n_groups} groups: remove between 0 and {n_groups - 1} "
                         "(at least one group stays)")
