"""How many groups each structure loses, to remove a budget of compute (or parameters) at the least total loss.

Pure functions of the per-structure loss curves (cumulative, 0 at 0 removed) and savings (what removing k groups
saves, 0 at 0: ``cost·k`` for MACs and parameters, :func:`linear_savings`; a measured latency adds a step at the
structure's full removal, where its module's per-call overhead goes too). ``global``: the Lagrangian choice — every
structure takes the count minimising curve[k] − λ·saving[k], with λ (loss per saved unit) the smallest that reaches
the budget, found by bisection; this is the optimum of the convex hulls of
the curves, so a non-convex curve cannot trap the allocation. ``uniform``: every structure loses the same fraction
of its groups, the smallest that reaches the budget.

The Lagrangian choice is only as good as the curves' common unit. A layer's loss relative to its own output energy
is not one: on EfficientNet-Lite0 the model's output error per unit of it is 10–30× larger in the blocks without a
residual sum than in those with one (bench/structured_allocation.py), so the global choice strips exactly the
blocks that hurt most. :func:`output_scaled_curves` puts every curve in the model's unit, from one measurement of
the model's output error per structure (cap_dist/structured/trial.py), before the Lagrangian choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_BISECTIONS = 200


class BudgetError(ValueError):
    """The requested target cannot be reached within the per-structure limits."""


Savings = Mapping[str, torch.Tensor]


def linear_savings(costs: Mapping[str, float], lengths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``cost·k`` for k = 0 .. ``lengths[name] - 1``: every group saves the same."""
    return {n: costs[n] * torch.arange(lengths[n], dtype=torch.float64) for n in costs}


def _check(curves: Mapping[str, torch.Tensor], savings: Savings, budget: float) -> None:
    if set(curves) != set(savings):
        raise ValueError(f"curves and savings must name the same structures; differ on "
                         f"{sorted(set(curves) ^ set(savings))[:5]}")
    bad = [n for n in curves if len(savings[n]) != len(curves[n])]
    if bad:
        raise ValueError(f"{bad[:3]}: a saving per count must accompany every point of the loss curve")
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    reachable = sum(float(savings[n][_deepest(c)]) for n, c in curves.items())
    if budget > reachable * (1 + 1e-12):
        raise BudgetError(f"removing {budget:.4g} needs more than the structures allow ({reachable:.4g} at their "
                          "limits); lower the target's reduction or raise structured.max_fraction")


def _deepest(curve: torch.Tensor) -> int:
    """The largest count a curve allows (counts that break a width rule carry an infinite loss)."""
    return int(torch.isfinite(curve).nonzero().max())


def _counts_at(lam: float, curves: Mapping[str, torch.Tensor], savings: Savings) -> dict[str, int]:
    return {n: int(torch.argmin(curve.double() - lam * savings[n].double())) for n, curve in curves.items()}


def _saved(counts: Mapping[str, int], savings: Savings) -> float:
    return sum(float(savings[n][k]) for n, k in counts.items())


def lagrangian_counts(curves: Mapping[str, torch.Tensor], savings: Savings, budget: float) -> dict[str, int]:
    """Groups to remove per structure: ``curves[name][k]`` is the loss after removing k groups (``len - 1`` is that
    structure's limit), ``savings[name][k]`` what removing them saves; the saved total reaches ``budget``."""
    _check(curves, savings, budget)
    if budget == 0:
        return {name: 0 for name in curves}
    hi = max((float(c[k]) / float(savings[n][k]) for n, c in curves.items()
              if (k := _deepest(c)) > 0 and float(savings[n][k]) > 0), default=0.0) + 1.0
    lo = 0.0
    while _saved(_counts_at(hi, curves, savings), savings) < budget:     # flat curves: the bound may need room
        hi *= 2.0
        if not math.isfinite(hi):
            raise BudgetError(f"no allocation reaches the budget {budget:.4g}")
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _saved(_counts_at(mid, curves, savings), savings) >= budget:
            hi = mid
        else:
            lo = mid
    return _counts_at(hi, curves, savings)


def uniform_counts(groups: Mapping[str, int], valid: Mapping[str, torch.Tensor], savings: Savings,
                   budget: float) -> dict[str, int]:
    """The same fraction f of every structure's groups (rounded down to a count ``valid[name]`` allows), the least
    f that reaches the budget. ``valid[name][k]``: whether removing k groups is allowed (k = 0 .. its limit)."""
    curves = {n: torch.where(v, 0.0, torch.inf) for n, v in valid.items()}
    _check(curves, savings, budget)

    def counts(fraction: float) -> dict[str, int]:
        out = {}
        for n, g in groups.items():
            allowed = valid[n][: min(len(valid[n]) - 1, int(round(fraction * g))) + 1].nonzero()
            out[n] = int(allowed.max()) if allowed.numel() else 0
        return out

    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _saved(counts(mid), savings) >= budget:
            hi = mid
        else:
            lo = mid
    return counts(hi)


def smallest_valid_at_least(valid: torch.Tensor, count: float) -> int:
    """The smallest count ``k >= count`` that ``valid[k]`` allows (``valid[0]`` is always allowed)."""
    allowed = valid.nonzero().squeeze(1)
    above = allowed[allowed.double() >= count - 1e-9]
    if above.numel() == 0:
        raise BudgetError(f"no allowed count reaches {count:.4g} (at most {int(allowed.max())})")
    return int(above.min())


def blend_counts(a: Mapping[str, int], b: Mapping[str, int], alpha: float,
                 valid: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per structure the smallest allowed count at or above ``alpha·a + (1 − alpha)·b``. Where what a structure
    saves is linear in its count (MACs, parameters), a blend of two counts that reach a budget reaches it too."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    return {n: smallest_valid_at_least(valid[n], alpha * a[n] + (1.0 - alpha) * b[n]) for n in a}


def probe_counts(uniform: Mapping[str, int], valid: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Where to measure each structure's effect on the model's output: at its count under the uniform allocation
    (a typical depth for the target), at least one group (the least allowed count above 0), 0 when none is."""
    out = {}
    for n, k in uniform.items():
        allowed = valid[n].nonzero().squeeze(1)
        allowed = allowed[allowed > 0]
        out[n] = k if k > 0 else (int(allowed.min()) if allowed.numel() else 0)
    return out


def output_scaled_curves(curves: Mapping[str, torch.Tensor], probes: Mapping[str, int],
                         errors: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Every layer loss curve rescaled to the model's output error: ``curve · e / curve[k]`` where ``e`` is the
    output error measured with that structure alone cut to its probe count ``k``. Both are second order in the
    perturbation, so their ratio is the structure's output sensitivity per unit of layer loss; the Lagrangian
    allocation then compares structures in one unit (the model's) instead of each layer's own.

    A structure probed at 0 groups or whose layer loss is 0 at its probe gets the median sensitivity of the
    others (no measurement can give it one)."""
    if set(curves) != set(probes) or set(curves) != set(errors):
        raise ValueError("curves, probe counts and measured errors must name the same structures")
    scale: dict[str, float] = {}
    for n, curve in curves.items():
        k = probes[n]
        if errors[n] < 0 or not math.isfinite(errors[n]):
            raise ValueError(f"{n}: measured output error {errors[n]} must be finite and >= 0")
        if k > 0 and math.isfinite(float(curve[k])) and float(curve[k]) > 0:
            scale[n] = errors[n] / float(curve[k])
    fallback = float(torch.tensor(list(scale.values()), dtype=torch.float64).median()) if scale else 1.0
    return {n: curve.double() * scale.get(n, fallback) for n, curve in curves.items()}
