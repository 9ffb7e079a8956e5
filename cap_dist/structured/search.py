"""A structured allocation found on the model's own output error: greedy removal in context, one level at a time.

The calibrated allocation (:func:`cap_dist.structured.allocate.output_scaled_curves`) measures every structure's
effect on the output *alone* and then adds them up. That misses interactions, and on a ViT with whole branches
removable they decide everything: one attention branch removed costs little, every attention branch removed leaves
no token mixing at all and the classifier predicts one class for every image (seen on vit4mnist at 60 % of the
batch-1 latency: the summed single-branch errors chose exactly that, top-1 0.099, in two of five runs).

:func:`greedy_output_counts` is the structured form of CAP's idea at the level of the model: remove one step at a
time, each time the step whose *measured* output error, given everything removed so far, rises least per unit of
saving. A step is one level of a structure (:func:`removal_levels`: about an eighth of its groups, or its whole
branch). Steps are re-measured lazily: a step's last score is kept until it reaches the top of the queue, then
measured again in the current context and taken only if it is still the best (the usual lazy greedy; a few output
passes per step instead of one per structure). When the budget is reached, steps that overshoot it are given back
where the budget stays met and the error falls (:func:`_give_back`).

Pure: the model is behind ``error_of`` (counts -> mean output error on the calibration images).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from cap_dist.structured.allocate import BudgetError, Savings

LEVELS = 8


def removal_levels(valid: Mapping[str, torch.Tensor], groups: Mapping[str, int],
                   levels: int = LEVELS) -> dict[str, list[int]]:
    """Per structure the counts the search steps through, ascending, 0 excluded: for i = 1 .. ``levels`` the
    smallest allowed count at or above i/levels of its groups, its largest allowed count (its whole branch where
    that is allowed) and its largest below all of its groups. A structure allowing no cut gets no levels."""
    out = {}
    for n, v in valid.items():
        allowed = v.nonzero().squeeze(1)
        allowed = allowed[allowed > 0]
        picks = set()
        for i in range(1, levels + 1):
            above = allowed[allowed.double() >= i * groups[n] / levels - 1e-9]
            if above.numel():
                picks.add(int(above.min()))
        if allowed.numel():
            picks.add(int(allowed.max()))
        if (partial := allowed[allowed < groups[n]]).numel():
            picks.add(int(partial.max()))           # the narrowest the module may get short of removing it
        out[n] = sorted(picks)
    return out


@dataclass
class SearchResult:
    """The greedy's counts, their measured output error and how many output passes it took."""

    counts: dict[str, int]
    error: float
    passes: int


def _next_level(levels: list[int], count: int) -> int | None:
    return next((k for k in levels if k > count), None)


def _gain(savings: Savings, name: str, old: int, new: int) -> float:
    return float(savings[name][new]) - float(savings[name][old])


def greedy_output_counts(levels: Mapping[str, list[int]], savings: Savings, budget: float,
                         error_of: Callable[[dict[str, int]], float], max_passes: int) -> SearchResult:
    """Counts that save at least ``budget``, built greedily on the measured output error (module docstring).
    Raises :class:`BudgetError` when the levels cannot reach the budget, or when reaching it would take more than
    ``max_passes`` output passes (say so rather than return a half-searched allocation)."""
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    reachable = sum(float(savings[n][ks[-1]]) for n, ks in levels.items() if ks)
    if budget > reachable * (1 + 1e-12):
        raise BudgetError(f"removing {budget:.4g} needs more than the structures allow ({reachable:.4g})")
    counts = {n: 0 for n in levels}
    error, saved, passes, version = 0.0, 0.0, 0, 0

    def measure(trial: dict[str, int]) -> float:
        nonlocal passes
        if passes >= max_passes:
            raise BudgetError(f"the output-guided allocation search needed more than {max_passes} output passes "
                              "before reaching the budget; raise structured.search_passes or set "
                              "structured.search: false")
        passes += 1
        return error_of(trial)

    def score(name: str) -> tuple[float, int, float] | None:
        new = _next_level(levels[name], counts[name])
        if new is None:
            return None
        after = measure({**counts, name: new})
        gain = _gain(savings, name, counts[name], new)
        return ((after - error) / gain if gain > 0 else math.inf), new, after

    queue: list[tuple[float, str, int, float, int]] = []       # (ratio, name, count, error after, version)
    for n in sorted(levels):
        if budget > 0 and (s := score(n)) is not None:
            heapq.heappush(queue, (s[0], n, s[1], s[2], version))
    while saved < budget * (1 - 1e-12):
        ratio, name, new, after, seen = heapq.heappop(queue)
        if seen != version:                                     # stale: measure again in the current context
            if (s := score(name)) is not None:
                heapq.heappush(queue, (s[0], name, s[1], s[2], version))
            continue
        saved += _gain(savings, name, counts[name], new)
        counts[name], error, version = new, after, version + 1
        if (s := score(name)) is not None:
            heapq.heappush(queue, (s[0], name, s[1], s[2], version))
    return SearchResult(counts, error, passes)


class _PassLimit(Exception):
    """The output-pass allowance ran out during refinement (the best allocation so far stands)."""


def refine_counts(start: Mapping[str, int], levels: Mapping[str, list[int]], savings: Savings, budget: float,
                  error_of: Callable[[dict[str, int]], float], max_passes: int,
                  start_error: float | None = None) -> SearchResult:
    """Local search from ``start`` (which saves at least ``budget``) on the measured output error, first
    improvement: a move gives back one structure's last level, or all of it, and, where the budget then falls
    short, takes the smallest next level of one other structure that makes it up (a swap). Stops when no move
    improves, or after ``max_passes`` output passes with the best found so far (logged by the caller from
    ``passes``)."""
    counts = dict(start)
    passes = 0

    def measure(trial: dict[str, int]) -> float:
        nonlocal passes
        if passes >= max_passes:
            raise _PassLimit
        passes += 1
        return error_of(trial)

    def saved_by(c: Mapping[str, int]) -> float:
        return sum(float(savings[n][k]) for n, k in c.items())

    def moves(c: dict[str, int]) -> list[dict[str, int]]:
        out, have = [], saved_by(c)
        for n in sorted(c):
            if c[n] == 0:
                continue
            for lower in sorted({max((k for k in levels[n] if k < c[n]), default=0), 0}, reverse=True):
                left = have - _gain(savings, n, lower, c[n])
                if left >= budget * (1 - 1e-12):
                    out.append({**c, n: lower})
                    continue
                for m in sorted(c):
                    if m == n:
                        continue
                    up = next((k for k in levels[m] if k > c[m]
                               and left + _gain(savings, m, c[m], k) >= budget * (1 - 1e-12)), None)
                    if up is not None:
                        out.append({**c, n: lower, m: up})
        return out

    try:
        error = start_error if start_error is not None else measure(counts)
        tried: set[tuple[int, ...]] = set()
        improved = True
        while improved:
            improved = False
            for trial in moves(counts):
                key = tuple(trial[n] for n in sorted(trial))
                if key in tried:
                    continue
                tried.add(key)
                after = measure(trial)
                if after < error:
                    counts, error, improved = trial, after, True
                    break
    except _PassLimit:
        pass
    return SearchResult(counts, error, passes)
