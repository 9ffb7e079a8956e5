"""Sparsity patterns and allocation: unstructured / N:M parsing, exact top-k masks, and the
choice of how much to prune where — across the rows of a layer (from removal losses, as OBC
does) and across the layers of a model (uniform, or global from comparable loss curves)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """``n_keep`` of every ``m`` consecutive input weights survive (N:M); ``m == 0`` means unstructured."""

    n_keep: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def n_prune(self) -> int:
        return self.m - self.n_keep

    @property
    def sparsity(self) -> float:
        return self.n_prune / self.m if self.m else float("nan")

    def __str__(self) -> str:
        return f"{self.n_keep}:{self.m}" if self.m else "unstructured"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (N kept of every M, e.g. ``"2:4"``); a :class:`Pattern` (a recipe's
    ``prune.pattern``, already parsed) is returned as it is."""
    if isinstance(pattern, Pattern):
        return pattern
    if pattern == "unstructured":
        return Pattern()
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern={pattern!r} is neither 'unstructured' nor 'N:M' such as '2:4'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r}: need 0 < N < M (N weights kept of every M)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1): give the fraction of weights to remove")
    return float(sparsity)


def check_divisible(columns: int, pattern: Pattern) -> None:
    if pattern.structured and columns % pattern.m:
        raise ValueError(f"pattern {pattern} needs the input width to be a multiple of {pattern.m}, "
                         f"but the layer has {columns} input columns")


def prune_count(total: int, sparsity: float) -> int:
    """Weights to remove so that exactly ``round(sparsity · total)`` are gone."""
    return int(round(sparsity * total))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (True = kept) removing exactly the ``k`` lowest scores over the whole tensor."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    return keep.reshape(scores.shape)


THRESHOLD_SAMPLE = 1 << 15
"""Scores in the evenly strided sample from which the unstructured projection brackets its threshold."""
THRESHOLD_SIGMAS = 5.0
"""Half-width of that bracket in binomial standard deviations of the sample rank (a miss costs one full
selection, not a wrong mask)."""


def threshold_keep(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, float | None]:
    """Keep-mask removing exactly the ``count`` lowest ``scores`` (as ``lowest_k_mask``), and the threshold.

    The threshold is looked for in a narrow band of scores first: the band between two quantiles of an evenly
    strided sample of THRESHOLD_SAMPLE scores, wide enough (THRESHOLD_SIGMAS binomial deviations of the
    sample's rank) to hold the count-th lowest score almost surely, so one selection among ~2 % of the
    scores and a few passes over the layer replace a selection over all of it; a band that misses falls back
    to the whole layer.  Scores tied at the threshold are removed in index order up to ``count``."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool), None
    if count >= n:
        return torch.zeros_like(scores, dtype=torch.bool), None
    thr = None
    step = n // THRESHOLD_SAMPLE
    if step >= 4:
        sample = flat[::step]
        m = sample.numel()
        centre = count / n * m
        margin = THRESHOLD_SIGMAS * math.sqrt(centre * (1.0 - count / n)) + 2.0
        k_lo, k_hi = math.floor(centre - margin), math.ceil(centre + margin)
        lo = torch.kthvalue(sample, k_lo).values if k_lo >= 1 else None
        hi = torch.kthvalue(sample, k_hi).values if k_hi <= m else None
        below = int(torch.count_nonzero(flat < lo)) if lo is not None else 0
        if below < count:
            inside = flat >= lo if lo is not None else torch.ones_like(flat, dtype=torch.bool)
            if hi is not None:
                inside &= flat <= hi
            band = flat[inside]
            if below + band.numel() >= count:
                thr = torch.kthvalue(band, count - below).values
    if thr is None:
        thr = torch.kthvalue(flat, count).values
    keep = (flat <= thr).logical_not_()                                    # NaN is kept, as by lowest_k_mask
    extra = n - int(torch.count_nonzero(keep)) - count
    if extra:                                                              # ties at the threshold
        tied = torch.nonzero(flat == thr).flatten()
        keep[tied[tied.numel() - extra:]] = True
    return keep.reshape(scores.shape), float(thr)


def lowest_k_per_row_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing exactly the ``k`` lowest scores of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, False)
    return keep


N_M_RANK_GROUPS = 4096
"""From this many groups (with M ≤ N_M_RANK_MAX_M), :func:`n_m_mask` ranks by comparisons instead of a top-k."""
N_M_RANK_MAX_M = 8


def n_m_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask removing the ``M − N`` lowest scores of every group of ``M`` consecutive columns.

    On many groups with a small M (ADMM's projection of a whole layer), every score's rank in its group is
    counted by M(M − 1) elementwise comparisons of columns, ties going to the earlier column: ~3× faster than a
    top-k over groups of 4 (768×3072, one thread).  Few groups (a column sweep's), a larger M or NaN scores
    take the top-k."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    if pattern.m <= N_M_RANK_MAX_M and rows * (cols // pattern.m) >= N_M_RANK_GROUPS:
        _, high = torch.aminmax(scores)                   # NaN propagates: ranks need a total order
        if not bool(torch.isnan(high)):
            flat = groups.reshape(-1, pattern.m)
            rank = torch.zeros(flat.shape, dtype=torch.uint8, device=scores.device)
            for i in range(pattern.m):
                for j in range(pattern.m):
                    if j != i:                            # j counts below i if lower, or equal and earlier
                        rank[:, i] += flat[:, j] <= flat[:, i] if j < i else flat[:, j] < flat[:, i]
            return (rank >= pattern.n_prune).reshape(rows, cols)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, pattern.n_prune, dim=2, largest=False, sorted=False).indices, False)
    return keep.reshape(rows, cols)


def is_valid_n_m(mask: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of M consecutive columns keeps exactly N weights."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1) == pattern.n_keep).all())


def removal_order(step_losses: torch.Tensor) -> torch.Tensor:
    """Global order in which the (row, step) removals are taken: by non-decreasing increments.

    Increments are made non-decreasing per row (running maximum); a stable sort then keeps ties
    in step order, so every prefix of the returned order takes a prefix of each row's greedy
    order.  With convex per-row curves this minimises the summed loss for any total.
    """
    monotone = torch.cummax(step_losses, dim=1).values.reshape(-1)
    return torch.sort(monotone, stable=True).indices


def allocate_rows(step_losses: torch.Tensor, total: int,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """How many weights each row removes, from its greedy removal losses.

    ``step_losses[r, t]`` is the loss of the t-th removal of row r (greedy order); the ``total``
    first removals of :func:`removal_order` are taken.  Without that ``order`` they are selected, not sorted:
    the ``total`` lowest running-maximum keys, ties in index order (:func:`threshold_keep`), which is the same
    set as the stable sort's prefix and, the keys being non-decreasing along each row, a prefix of every row.

    Returns:
        counts ``[rows]`` (int64) summing to ``total``.
    """
    rows, depth = step_losses.shape
    if total > rows * depth:
        raise ValueError(f"cannot remove {total} weights from {rows} rows searched to depth {depth}")
    counts = torch.zeros(rows, dtype=torch.int64, device=step_losses.device)
    if total == 0:
        return counts
    if order is None:
        keep, _ = threshold_keep(torch.cummax(step_losses, dim=1).values, total)
        return depth - keep.sum(1)
    taken = order[:total]
    return counts.index_add_(0, taken // depth, torch.ones_like(taken))


@dataclass
class LossCurve:
    """A layer's removal loss as a function of its sparsity (for allocation across layers).

    ``loss[i]`` is the (estimated) increase of the layer's objective when ``sparsity[i]`` of its
    weights are removed; ``energy`` is the dense layer's objective scale, ½·tr(W H Wᵀ) = ‖WX‖²/N
    for input Hessians, so ``loss / energy`` is the relative output error.
    """

    sparsity: torch.Tensor
    loss: torch.Tensor
    energy: float
    numel: int

    def at(self, sparsity: float) -> float:
        """Loss at ``sparsity``, by linear interpolation on the grid."""
        s, l = self.sparsity.double(), self.loss.double()
        if sparsity > float(s[-1]) + 1e-12:
            return float("inf")
        hi = int(torch.searchsorted(s, torch.tensor([sparsity], dtype=s.dtype)).item())
        hi = min(max(hi, 1), len(s) - 1)
        lo = hi - 1
        t = (sparsity - float(s[lo])) / max(float(s[hi] - s[lo]), 1e-300)
        return float(l[lo] + t * (l[hi] - l[lo]))


def allocate_uniform(names: list[str], sparsity: float) -> dict[str, float]:
    check_sparsity(sparsity)
    return {name: sparsity for name in names}


def allocate_global(curves: dict[str, LossCurve], sparsity: float, *, normalize: bool = True,
                    max_layer_sparsity: float = 0.95, steps: int = 200) -> dict[str, float]:
    """Per-layer sparsities that reach the global target with the least summed loss.

    Losses of different layers are made comparable by dividing each curve by the dense layer's
    output energy (``normalize=True``): every layer then reports the *relative* error of its
    output, ‖(W−Ŵ)X‖²/‖WX‖², which is scale-free (a layer whose inputs are 10× larger has 100×
    larger raw losses but the same relative error).  Fisher losses are already in units of the
    training loss and may be used raw (``normalize=False``).

    The allocation is greedy on marginal cost: weights are released in small quanta to the layer
    whose loss grows least per weight removed, which is optimal for convex curves.
    """
    check_sparsity(sparsity)
    if not curves:
        raise ValueError("global allocation needs at least one layer")
    names = list(curves)
    total = sum(c.numel for c in curves.values())
    target = sparsity * total
    levels = {n: 0.0 for n in names}
    removed = 0.0
    quantum = target / steps if target > 0 else 0.0

    def cost(name: str, s: float) -> float:
        c = curves[name]
        scale = c.energy if normalize and c.energy > 0 else 1.0
        return c.at(s) / scale

    while removed < target - 1e-9:
        best, best_name, best_ds = float("inf"), None, 0.0
        for name in names:
            c = curves[name]
            ds = min(quantum, target - removed) / c.numel
            limit = min(max_layer_sparsity, float(c.sparsity[-1]))
            new = min(levels[name] + ds, limit)
            if new <= levels[name] + 1e-15:
                continue
            marginal = (cost(name, new) - cost(name, levels[name])) / ((new - levels[name]) * c.numel)
            if marginal < best:
                best, best_name, best_ds = marginal, name, new - levels[name]
        if best_name is None:
            raise ValueError(f"global sparsity {sparsity} cannot be reached: every layer is at its limit "
                             f"(max_layer_sparsity={max_layer_sparsity} or the depth its curve covers)")
        levels[best_name] += best_ds
        removed += best_ds * curves[best_name].numel
    return levels
