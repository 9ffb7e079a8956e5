"""Actor planning: contiguous ranges, every actor owns a block, the heaviest load is as small as it can be."""

from __future__ import annotations

import itertools

import pytest

from cap_dist.engines.distributed.plan import StageCost, plan_actors


def stages(block_loads: list[int]) -> list[StageCost]:
    ends = [StageCost("prefix", 1, 0, 0.0)]
    blocks = [StageCost(f"blocks.{i}", w, w, float(w)) for i, w in enumerate(block_loads)]
    return ends + blocks + [StageCost("suffix", 1, 0, 0.0)]


def test_plan_is_contiguous_and_covers_everything() -> None:
    costs = stages([5, 1, 1, 1, 1, 5])
    plans = plan_actors(costs, 3, 6)
    names = [n for p in plans for n in p.stages]
    assert names == [c.name for c in costs]
    assert plans[0].stages[0] == "prefix" and plans[-1].stages[-1] == "suffix"
    assert all(any(s.startswith("blocks.") for s in p.stages) for p in plans)


def test_plan_minimises_the_heaviest_actor() -> None:
    loads = [5, 1, 1, 1, 1, 5, 2, 2]
    costs = stages(loads)
    plans = plan_actors(costs, 3, len(loads))
    got = max(p.weight_bytes for p in plans)
    best = min(max(sum(loads[a:b]) for a, b in zip((0, *cuts), (*cuts, len(loads))))
               for cuts in itertools.combinations(range(1, len(loads)), 2))
    assert got - 2 <= best                         # the prefix/suffix bytes ride with the end actors


@pytest.mark.parametrize("actors,message", [(0, "at least 1"), (7, "only 6 blocks")])
def test_impossible_plans(actors: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_actors(stages([1] * 6), actors, 6)
