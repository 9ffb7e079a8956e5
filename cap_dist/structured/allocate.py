"""How many groups each structure loses, to remove a budget of compute (or parameters) at the least total loss.

Pure functions of the per-structure loss curves (cumulative, relative to the layer's output energy, 0 at 0
removed) and the cost of one group. ``global``: the Lagrangian choice — every structure takes the count minimising
curve[k] − λ·cost·k, with λ (loss per saved MAC) the smallest that reaches the budget, found by bisection; this is
the optimum of the convex hulls of the curves, so a non-convex curve cannot trap the allocation. ``uniform``: every
structure loses the same fraction of its groups, the smallest that reaches the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_BISECTIONS = 200


class BudgetError(ValueError):
    """The requested target cannot be reached within the per-structure limits."""


def _check(curves: Mapping[str, torch.Tensor], costs: Mapping[str, float], budget: float) -> None:
    if set(curves) != set(costs):
        raise ValueError(f"curves and costs must name the same structures; differ on "
                         f"{sorted(set(curves) ^ set(costs))[:5]}")
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    reachable = sum(costs[n] * _deepest(c) for n, c in curves.items())
    if budget > reachable * (1 + 1e-12):
        raise BudgetError(f"removing {budget:.4g} needs more than the structures allow ({reachable:.4g} at their "
                          "limits); lower the target's reduction or raise structured.max_fraction")


def _deepest(curve: torch.Tensor) -> int:
    """The largest count a curve allows (counts that break a width rule carry an infinite loss)."""
    return int(torch.isfinite(curve).nonzero().max())


def _counts_at(lam: float, curves: Mapping[str, torch.Tensor], costs: Mapping[str, float]) -> dict[str, int]:
    out = {}
    for name, curve in curves.items():
        k = torch.arange(len(curve), dtype=torch.float64)
        out[name] = int(torch.argmin(curve.double() - lam * costs[name] * k))
    return out


def _saved(counts: Mapping[str, int], costs: Mapping[str, float]) -> float:
    return sum(costs[n] * k for n, k in counts.items())


def lagrangian_counts(curves: Mapping[str, torch.Tensor], costs: Mapping[str, float], budget: float) -> dict[str, int]:
    """Groups to remove per structure: ``curves[name][k]`` is the loss after removing k groups (``len - 1`` is that
    structure's limit), ``costs[name]`` what one group saves; the removed total reaches ``budget``."""
    _check(curves, costs, budget)
    if budget == 0:
        return {name: 0 for name in curves}
    hi = max((float(c[_deepest(c)]) / costs[n] for n, c in curves.items() if _deepest(c) > 0), default=0.0) + 1.0
    lo = 0.0
    while _saved(_counts_at(hi, curves, costs), costs) < budget:      # flat curves: the bound may need room
        hi *= 2.0
        if not math.isfinite(hi):
            raise BudgetError(f"no allocation reaches the budget {budget:.4g}")
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _saved(_counts_at(mid, curves, costs), costs) >= budget:
            hi = mid
        else:
            lo = mid
    return _counts_at(hi, curves, costs)


def uniform_counts(groups: Mapping[str, int], valid: Mapping[str, torch.Tensor], costs: Mapping[str, float],
                   budget: float) -> dict[str, int]:
    """The same fraction f of every structure's groups (rounded down to a count ``valid[name]`` allows), the least
    f that reaches the budget. ``valid[name][k]``: whether removing k groups is allowed (k = 0 .. its limit)."""
    curves = {n: torch.where(v, 0.0, torch.inf) for n, v in valid.items()}
    _check(curves, costs, budget)

    def counts(fraction: float) -> dict[str, int]:
        out = {}
        for n, g in groups.items():
            allowed = valid[n][: min(len(valid[n]) - 1, int(round(fraction * g))) + 1].nonzero()
            out[n] = int(allowed.max()) if allowed.numel() else 0
        return out

    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _saved(counts(mid), costs) >= budget:
            hi = mid
        else:
            lo = mid
    return counts(hi)
