"""CAP: correlation-aware pruning of one layer by greedy OBS elimination (Kuznedelev et al. 2023).

Input-Hessian curvature, columns in blocks of B (``block_size=None``: one block = whole rows,
the exact OBC algorithm).  With U the upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹), the inverse
Hessian of the not-yet-fixed columns F = {j, …} is U_FFᵀ U_FF, so for the block b = [j, j+B):
    H⁻¹_bb | earlier columns fixed  =  U_bbᵀ U_bb                                  (1)
For every block:
  1. greedy OBS search of every row inside the block on (1), to the deepest removal count any
     row may need (early stop), recording order and step losses;
  2. how many weights each row removes: the block's exact share of the layer target, spread
     over rows by a sort of the accumulated losses (:func:`allocate_rows`);
  3. replay each row to its depth: exact block weights for that mask;
  4. carry the block's change δW_b to all later columns exactly (SparseGPT's lazy update):
         X U_bb = δW_b ,   W[:, later] += X · U[b, later].                          (2)
Every step is exact OBS on the free columns, so the losses sum to the layer's objective.

Fisher curvature: the flattened weight in blocks of B contiguous weights, each with its own
inverse; blocks are independent (block-diagonal), rows allocated across all blocks.
"""

from __future__ import annotations

import math
import time

import torch

from cap_dist.solvers import greedy
from cap_dist.solvers.numerics import cholesky_inverse_escalating, inverse_factor
from cap_dist.solvers.patterns import LossCurve, Pattern, allocate_rows, prune_count, removal_order
from cap_dist.solvers.products import matmul

CURVE_POINTS = 64


def greedy_kernels(backend: str, device: torch.device):
    if backend == "auto":
        backend = "numba" if device.type == "cpu" else "torch"
    if backend == "numba":
        if device.type != "cpu":
            raise ValueError("backend='numba' runs on the CPU; use backend='torch' for tensors on "
                             f"{device.type}")
        return greedy.greedy_numba, greedy.replay_numba, backend
    if backend == "torch":
        return greedy.greedy_torch, greedy.replay_torch, backend
    raise ValueError(f"backend={backend!r} is not one of 'auto', 'numba', 'torch'")


def search_depth(width: int, sparsity: float, max_row_sparsity: float | None) -> int:
    """Deepest per-row removal count inside a block of ``width`` columns (the greedy's early stop)."""
    if max_row_sparsity is None:
        max_row_sparsity = sparsity + 0.5 * (1.0 - sparsity)
    return min(width, max(math.ceil(width * max_row_sparsity), math.ceil(width * sparsity)))


class _CurveAccumulator:
    """Sums per-block loss curves at common sparsity fractions (the layer-level curve)."""

    def __init__(self, max_fraction: float, numel: int, target: float) -> None:
        grid = torch.linspace(0.0, max_fraction, CURVE_POINTS + 1, dtype=torch.float64)
        self.fractions = torch.unique(torch.cat([grid, torch.tensor([target], dtype=torch.float64)]))
        self.loss = torch.zeros_like(self.fractions)
        self.numel = numel

    def add_block(self, step_losses: torch.Tensor, order: torch.Tensor, block_numel: int) -> None:
        """Add a block's loss at every grid fraction: rows take removals in ``order`` (prefixes of
        their greedy orders) and the actual step losses of those prefixes are summed."""
        taken = step_losses.reshape(-1)[order].double().cpu()
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(taken, 0)])
        ks = (self.fractions * block_numel).round().long().clamp(max=cum.numel() - 1)
        self.loss += cum[ks]

    def curve(self, energy: float) -> LossCurve:
        return LossCurve(self.fractions.clone(), self.loss.clone(), energy, self.numel)


def forced_prefix(prior_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns that must be removed first (ascending), padded with the others; and their count."""
    prefix = torch.argsort((~prior_block).to(torch.int8), dim=1, stable=True)
    return prefix, prior_block.sum(1)


def _forced_first(step: torch.Tensor, n_pre: torch.Tensor | None) -> torch.Tensor:
    """Ranking keys of the (row, step) removals: the step losses, with every forced (prior) removal first."""
    if n_pre is None:
        return step
    forced = torch.arange(step.shape[1], device=step.device).unsqueeze(0) < n_pre.to(step.device).unsqueeze(1)
    return torch.where(forced, torch.full_like(step, -math.inf), step)


def _search_as_deep_as_needed(search, block: torch.Tensor, hinv: torch.Tensor, which: torch.Tensor, depth: int,
                              least: int, share: int, prefix: torch.Tensor | None, n_pre: torch.Tensor | None,
                              deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's greedy search and row allocation, as if every row were searched to ``depth``, but
    searching most rows only part of the way (when no loss curve is wanted, steps no row takes are waste).

    Rows in ``deep`` (those that needed more than the shallow depth in the previous block: a row of zeros, a
    quiet unit) are searched to ``depth`` at once; the others to a shallower depth, halfway between the mean
    count ``least`` and ``depth``, and the block's ``share`` is allocated.  Shallow rows whose count reached
    their depth are searched again to ``depth`` (their first steps replayed as a forced prefix: the same
    arithmetic, the same order and losses) and the allocation is repeated.  This equals the allocation over
    full searches: a row that stops short of its searched depth does not take its next step, whose ranking
    key (the running maximum of its losses) bounds every later one of that row, and extending other rows can
    only lower its count.  Returns order, step losses (steps not searched are +inf), counts, and the rows whose
    count reached the shallow depth (the next block's ``deep``)."""
    dev = block.device
    rows = block.shape[0]
    shallow = min(depth, least + max(4, (depth - least) // 2))
    order = torch.zeros(rows, depth, dtype=torch.long, device=dev)
    step = torch.full((rows, depth), math.inf, dtype=block.dtype, device=dev)

    def run(idx: torch.Tensor | None, to: int, pre: torch.Tensor | None, pre_counts: torch.Tensor | None) -> None:
        part = slice(None) if idx is None else idx
        sub = block if idx is None else block[idx]
        o, s = search(sub, hinv, which if idx is None else which[idx], to,
                      prefix=None if pre is None else pre[part], prefix_counts=None if pre is None else pre_counts[part])
        order[part, :to], step[part, :to] = o.to(dev), s.to(dev)

    if shallow == depth or bool(deep.all()):
        run(None, depth, prefix, n_pre)
    elif not bool(deep.any()):
        run(None, shallow, prefix, n_pre)
    else:
        run(torch.nonzero(deep).flatten(), depth, prefix, n_pre)
        run(torch.nonzero(~deep).flatten(), shallow, prefix, n_pre)
    counts = allocate_rows(_forced_first(step, n_pre), share)
    if shallow < depth:
        more = torch.nonzero((counts >= shallow) & ~deep).flatten()
        if more.numel():
            run(more, depth, order[:, :shallow].cpu(), torch.full((rows,), shallow, dtype=torch.long))
            counts = allocate_rows(_forced_first(step, n_pre), share)
    return order, step, counts, counts >= shallow


def cap_activation(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
                   block_size: int | None, damp: float, backend: str = "auto",
                   max_row_sparsity: float | None = None, prior: torch.Tensor | None = None,
                   damp_mode: str = "relative", loss_curve: bool = True) -> dict:
    """CAP with an input Hessian [in, in]; returns the fields of a LayerResult (without energy).

    ``prior`` (bool [out, in], True = already pruned): weights that must end pruned (gradual pruning keeps
    earlier masks). In every block each row removes its prior weights first, with the same exact OBS
    updates (they are ~0 but the compensation of earlier blocks may have moved them), then continues
    greedily; the ranking across rows takes all forced removals before any free one."""
    rows, cols = weight.shape
    width = cols if block_size is None else min(block_size, cols)
    if pattern.structured and width % pattern.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={pattern.m} for pattern {pattern}")
    search, replay, backend = greedy_kernels(backend, weight.device)
    dev = weight.device
    if prior is not None and pattern.structured:
        over = prior.reshape(rows, cols // pattern.m, pattern.m).sum(-1) > pattern.n_prune
        if bool(over.any()):
            raise ValueError(f"the weights already pruned break pattern {pattern}: some groups of {pattern.m} "
                             f"have more than {pattern.n_prune} zeros")
    work = weight.dtype if weight.dtype == torch.float64 else torch.float32
    t0 = time.perf_counter()
    u, fac = inverse_factor(hessian, damp, work, damp_mode)                # UᵀU = H⁻¹
    t_factor = time.perf_counter() - t0
    w = weight.to(work).clone()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    losses = torch.zeros(rows, cols, dtype=work, device=weight.device)
    removal_step = torch.full((rows, cols), -1, dtype=torch.long, device=weight.device)
    zeros_which = torch.zeros(rows, dtype=torch.long, device=weight.device)
    depth_all = search_depth(width, sparsity, max_row_sparsity)
    curve = (None if pattern.structured or not loss_curve
             else _CurveAccumulator(depth_all / width, rows * cols, sparsity))
    removed = 0
    deep = torch.zeros(rows, dtype=torch.bool, device=weight.device)     # rows searched to full depth at once
    for j0 in range(0, cols, width):
        j1 = min(j0 + width, cols)
        b = j1 - j0
        u_bb = u[j0:j1, j0:j1]
        hinv_bb = (u_bb.T @ u_bb).unsqueeze(0)                             # (1): [1, b, b]
        block = w[:, j0:j1]
        prefix = n_pre = None
        if prior is not None and bool(prior[:, j0:j1].any()):
            prefix, n_pre = forced_prefix(prior[:, j0:j1])
        if pattern.structured:
            depth = b // pattern.m * pattern.n_prune
            order, step = search(block, hinv_bb, zeros_which, depth, pattern.m, pattern.n_prune,
                                 prefix=prefix, prefix_counts=n_pre)
            order, step = order.to(dev), step.to(dev)
            counts = torch.full((rows,), depth, dtype=torch.long, device=dev)
        else:
            share = prune_count(rows * j1, sparsity) - removed             # exact cumulative share
            forced_total = int(n_pre.sum()) if n_pre is not None else 0
            share = max(share, forced_total)
            least = max(math.ceil(share / rows), int(n_pre.max()) if n_pre is not None else 0)
            depth = min(b, max(search_depth(b, sparsity, max_row_sparsity), least))
            if curve is None:
                order, step, counts, deep = _search_as_deep_as_needed(search, block, hinv_bb, zeros_which, depth,
                                                                      least, share, prefix, n_pre, deep)
            else:
                order, step = search(block, hinv_bb, zeros_which, depth, prefix=prefix, prefix_counts=n_pre)
                order, step = order.to(dev), step.to(dev)
                key = _forced_first(step, n_pre)
                ranked = removal_order(key)
                counts = allocate_rows(key, share, ranked)
                curve.add_block(step, ranked, rows * b)
        removed += int(counts.sum())
        new_block = replay(block, hinv_bb, zeros_which, order, counts).to(device=dev, dtype=work)
        steps = torch.arange(order.shape[1], device=dev).unsqueeze(0)
        # The step at which each of the block's weights was removed (−1: kept), as a dense [rows, b] map: dense
        # writes instead of scattering each removal into four tensors. A row's first counts[r] steps remove
        # distinct weights, so the maximum over a column picks its step (untaken steps contribute −1).
        at = torch.full((rows, b), -1, dtype=torch.long, device=dev).scatter_reduce_(
            1, order, torch.where(steps < counts.unsqueeze(1), steps, -1), reduce="amax")
        gone = at >= 0
        keep[:, j0:j1] = ~gone
        losses[:, j0:j1] = torch.where(gone, step.gather(1, at.clamp_min(0)).to(work), 0.0)
        removal_step[:, j0:j1] = at
        new_block.masked_fill_(gone, 0.0)
        delta = new_block - block
        if j1 < cols:                                                       # (2)
            x = torch.linalg.solve_triangular(u_bb, delta, upper=True, left=False)
            w[:, j1:] += matmul(x, u[j0:j1, j1:])
        w[:, j0:j1] = new_block
    return dict(weight=w, mask=keep, losses=losses, curve=curve, removal_step=removal_step,
                info=dict(damp_used=fac.damp_used, escalations=fac.escalations, dead_inputs=fac.dead_inputs,
                          block_size=width, backend=backend, factor_seconds=t_factor, notes=fac.notes))


def cap_fisher(weight: torch.Tensor, fisher_blocks: torch.Tensor, sparsity: float, pattern: Pattern,
               damp: float, backend: str = "auto", max_row_sparsity: float | None = None,
               damp_mode: str = "relative") -> dict:
    """CAP with block-diagonal empirical Fisher ``[numel/B, B, B]`` (independent blocks)."""
    rows, cols = weight.shape
    n_blocks, width, _ = fisher_blocks.shape
    if pattern.structured and (width % pattern.m or cols % pattern.m):
        raise ValueError(f"Fisher block size {width} and input width {cols} must be multiples of M={pattern.m}")
    search, replay, backend = greedy_kernels(backend, weight.device)
    work = weight.dtype if weight.dtype == torch.float64 else torch.float32
    fac = cholesky_inverse_escalating(fisher_blocks, damp, work_dtype=work, mode=damp_mode)
    flat = weight.to(work).reshape(n_blocks, width)
    dev = weight.device
    which = torch.arange(n_blocks, device=dev)
    curve = None
    if pattern.structured:
        depth = width // pattern.m * pattern.n_prune
        order, step = search(flat, fac.inverse, which, depth, pattern.m, pattern.n_prune)
        order, step = order.to(dev), step.to(dev)
        counts = torch.full((n_blocks,), depth, dtype=torch.long, device=dev)
    else:
        total = prune_count(rows * cols, sparsity)
        depth = min(width, max(search_depth(width, sparsity, max_row_sparsity), math.ceil(total / n_blocks)))
        order, step = search(flat, fac.inverse, which, depth)
        order, step = order.to(dev), step.to(dev)
        ranked = removal_order(step)
        counts = allocate_rows(step, total, ranked)
        acc = _CurveAccumulator(depth / width, rows * cols, sparsity)
        acc.add_block(step, ranked, rows * cols)
        curve = acc
    new = replay(flat, fac.inverse, which, order, counts).to(device=dev, dtype=work)
    taken = torch.arange(order.shape[1], device=dev).unsqueeze(0) < counts.unsqueeze(1)
    b_idx = torch.arange(n_blocks, device=dev).unsqueeze(1).expand_as(order)[taken]
    keep = torch.ones_like(flat, dtype=torch.bool)
    losses = torch.zeros_like(flat)
    keep[b_idx, order[taken]] = False
    losses[b_idx, order[taken]] = step[taken].to(work)
    removal_step = torch.full_like(flat, -1, dtype=torch.long)
    removal_step[b_idx, order[taken]] = torch.nonzero(taken)[:, 1]
    new[~keep] = 0.0
    return dict(weight=new.reshape(rows, cols), mask=keep.reshape(rows, cols), losses=losses.reshape(rows, cols),
                curve=curve, removal_step=removal_step.reshape(rows, cols), info=dict(damp_used=fac.damp_used, escalations=fac.escalations,
                                       dead_inputs=fac.dead_inputs, block_size=width, backend=backend,
                                       curvature="fisher", notes=fac.notes))
