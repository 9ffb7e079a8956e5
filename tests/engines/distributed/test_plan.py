"""Actor planning: contiguous ranges, every actor owns a block, the heaviest load is as small as it can be; the
calibration stream cut into steps that keep the chain busy."""

from __future__ import annotations

import itertools

import pytest
import torch

from cap_dist.engines.distributed.plan import (StageCost, pipeline_idle, pipeline_note, pipeline_steps,
                                               plan_actors)


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


def test_pipeline_steps_keep_every_image_in_order_and_never_span_two_batches() -> None:
    batches = [torch.arange(8).float().reshape(8, 1), torch.arange(8, 13).float().reshape(5, 1)]
    steps = pipeline_steps(batches, 3)
    assert [len(s) for s in steps] == [3, 3, 2, 3, 2]
    assert torch.equal(torch.cat(steps), torch.cat(batches))
    assert pipeline_steps(batches, None) == batches


def test_pipeline_idle_is_the_fill_and_drain_of_the_chain() -> None:
    assert pipeline_idle(4, 2) == pytest.approx(1 / 5)        # the ViT-g bench: 4 batches of 8, 2 actors
    assert pipeline_idle(16, 2) == pytest.approx(1 / 17)
    assert pipeline_idle(10, 1) == 0.0


def test_pipeline_note_suggests_smaller_steps_only_where_the_chain_idles_much() -> None:
    note = pipeline_note([8, 8, 8, 8], None, 2)
    assert "4 steps of at most 8 images (whole batches)" in note and "idles 20%" in note
    assert "distributed.pipeline_images=2: 6%" in note                 # 32 / (8 · 2) images: 16 steps, 1/17
    cluster = pipeline_note([8] * 16, None, 32)                       # 31 of 47 steps idle
    assert "idles 66%" in cluster and "pipeline_images=1: 19%" in cluster   # 31 of 159
    assert "pipeline_images=" not in pipeline_note([2] * 16, None, 2)  # 1/17 already
    assert "pipeline_images=" not in pipeline_note([8, 8], None, 1)    # one actor never idles
    chosen = pipeline_note([8, 8, 8, 8], 2, 2)
    assert "16 steps of at most 2 images" in chosen and "idles 6%" in chosen and "pipeline_images=" not in chosen
