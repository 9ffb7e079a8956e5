"""Which actor holds which blocks: contiguous ranges that balance memory and solve cost.

Contiguity keeps the calibration stream a simple chain (actor 0 -> 1 -> ...), and a block's
memory (weights + Hessians + cached activations) and solve cost (rows·in·B² per layer) are known
before any weight is read, from the model skeleton alone.  The calibration stream through the chain can be cut
into steps smaller than a batch, so the chain idles less at its two ends (:func:`pipeline_steps`,
:func:`pipeline_note`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class StageCost:
    """What one stage (prefix, a block, suffix) costs its actor."""

    name: str
    weight_bytes: int
    hessian_bytes: int
    solve_flops: float


@dataclass(frozen=True)
class ActorPlan:
    index: int
    stages: tuple[str, ...]
    weight_bytes: int
    hessian_bytes: int
    solve_flops: float


def _loads(costs: list[StageCost]) -> list[float]:
    """Each stage's share of total memory plus its share of total solve cost (both matter equally)."""
    mem = [c.weight_bytes + c.hessian_bytes for c in costs]
    total_mem = sum(mem) or 1
    total_flops = sum(c.solve_flops for c in costs) or 1.0
    return [m / total_mem + c.solve_flops / total_flops for m, c in zip(mem, costs)]


def plan_actors(costs: list[StageCost], actors: int, blocks: int) -> list[ActorPlan]:
    """Split stages into ``actors`` contiguous ranges minimising the largest load (exact, by dynamic programming).

    Args:
        costs: prefix, the blocks, suffix, in model order.
        actors: how many actors.
        blocks: how many of the stages are blocks (each actor must own at least one).
    """
    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"distributed.actors={actors}: need at least 1 actor")
    if actors > blocks:
        raise ValueError(f"distributed.actors={actors} but the model has only {blocks} blocks: every actor needs "
                         f"at least one block; use at most {blocks} actors")
    load = _loads(costs)
    n = len(costs)
    prefix_sum = [0.0]
    for x in load:
        prefix_sum.append(prefix_sum[-1] + x)
    inf = float("inf")
    # best[k][i]: smallest max-load splitting the first i stages into k ranges; every range holds a block, so
    # range boundaries fall between blocks (the prefix goes with the first range, the suffix with the last).
    best = [[inf] * (n + 1) for _ in range(actors + 1)]
    cut = [[0] * (n + 1) for _ in range(actors + 1)]
    best[0][0] = 0.0
    valid_ends = set(range(2, n)) | {n}          # after block i (stage index i), or at the very end
    for k in range(1, actors + 1):
        for i in range(1, n + 1):
            if i not in valid_ends:
                continue
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or (j != 0 and j not in valid_ends) or (j == 0 and k != 1):
                    continue
                if i == n and j >= n - 1:        # the last range must hold a block, not just the suffix
                    continue
                value = max(best[k - 1][j], prefix_sum[i] - prefix_sum[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[actors][n] == inf:
        raise ValueError(f"cannot split {blocks} blocks over {actors} actors")
    bounds, i = [], n
    for k in range(actors, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    bounds.reverse()
    plans = []
    for index, (a, b) in enumerate(bounds):
        part = costs[a:b]
        plans.append(ActorPlan(index, tuple(c.name for c in part), sum(c.weight_bytes for c in part),
                               sum(c.hessian_bytes for c in part), sum(c.solve_flops for c in part)))
    return plans


def plan_table(plans: list[ActorPlan]) -> str:
    lines = [f"{'actor':>5}  {'stages':<40} {'weights':>10} {'hessians':>10} {'solve':>10}"]
    for p in plans:
        span = p.stages[0] if len(p.stages) == 1 else f"{p.stages[0]} .. {p.stages[-1]} ({len(p.stages)})"
        lines.append(f"{p.index:>5}  {span:<40} {p.weight_bytes / 2**20:8.1f}Mi {p.hessian_bytes / 2**20:8.1f}Mi "
                     f"{p.solve_flops / 1e9:8.1f}GF")
    return "\n".join(lines)


def plan_json(plans: list[ActorPlan]) -> str:
    return json.dumps([asdict(p) for p in plans], indent=1)


def shard_owners(held: list[list[str]], measured: list[list[str]]) -> list[list[str]]:
    """Which actor writes which tensor into its shard of the output: every tensor exactly once.

    ``held[i]``: the state-dict keys actor ``i`` holds; ``measured[i]``: the BatchNorm statistics it re-estimated.
    A tensor held by several actors (the modules outside the blocks: the first actor holds them for the prefix,
    the last for the suffix) is written by the last of them, except statistics re-estimated by the actor that
    runs their module, which that actor writes (another holder's copy was reset, not measured).

    Returns:
        ``owned[i]``: the keys actor ``i`` writes, in the order it holds them.
    """
    owner: dict[str, int] = {}
    for i, keys in enumerate(held):
        for key in keys:
            owner[key] = i
    for i, keys in enumerate(measured):
        for key in keys:
            if key not in held[i]:
                raise ValueError(f"actor {i} reports re-estimated statistics {key!r} it does not hold")
            owner[key] = i
    return [[k for k in keys if owner[k] == i] for i, keys in enumerate(held)]


# Steps per actor that the suggestion of :func:`pipeline_note` aims at: the chain idles actors − 1 steps in all, so
# with 8 steps per actor it idles at most 1/9 of the stream, whatever the number of actors.
PIPELINE_STEPS_PER_ACTOR = 8


def pipeline_steps(batches: list[torch.Tensor], images: int | None) -> list[torch.Tensor]:
    """The calibration batches cut into steps of at most ``images`` (None: the batches as they are), in order; a
    step never spans two batches."""
    return list(batches) if images is None else [part for x in batches for part in torch.split(x, images)]


def _step_count(batch_sizes: list[int], images: int | None) -> int:
    """How many steps :func:`pipeline_steps` makes of batches of these sizes."""
    return sum(math.ceil(b / (images or b)) for b in batch_sizes)


def pipeline_idle(steps: int, actors: int) -> float:
    """The share of the stream's time an actor idles: the chain fills and drains over actors − 1 steps."""
    return (actors - 1) / (steps + actors - 1)


def pipeline_note(batch_sizes: list[int], configured: int | None, actors: int) -> str:
    """One line on the calibration stream through the actors: its steps, how much of it the chain idles, and,
    where whole batches idle over a ninth of it, the ``distributed.pipeline_images`` that would idle at most that
    (about :data:`PIPELINE_STEPS_PER_ACTOR` steps per actor)."""
    images = sum(batch_sizes)
    steps = _step_count(batch_sizes, configured)
    size = f"{configured} images" if configured is not None else f"{max(batch_sizes)} images (whole batches)"
    line = (f"calibration: {images} images through {actors} actors in {steps} steps of at most {size}; the "
            f"chain idles {pipeline_idle(steps, actors):.0%} of the stream")
    suggested = max(1, math.ceil(images / (PIPELINE_STEPS_PER_ACTOR * actors)))
    if configured is None and pipeline_idle(steps, actors) > 1 / 9 + 1e-9 and suggested < max(batch_sizes):
        better = _step_count(batch_sizes, suggested)
        line += (f" (distributed.pipeline_images={suggested}: {pipeline_idle(better, actors):.0%}, at a few per cent "
                 "more work per image, with Hessians equal to the local engine's up to rounding only)")
    return line
