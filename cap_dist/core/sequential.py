"""Sequential pruning of one stage: calibrate its layers on the stage's actual (upstream-pruned) inputs and
solve them in order, so later layers see the pruned outputs of earlier ones. Both engines' sequential mode
runs it stage after stage: the local engine over the whole model, a Ray actor over its shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from cap_dist.core.hessians import collect_hessians, take_curvature
from cap_dist.core.records import LayerRecord
from cap_dist.core.solve import solve_layer
from cap_dist.core.stages import Stage

if TYPE_CHECKING:
    from cap_dist.config import PruneConfig


def solve_stage(stage: Stage, hidden: list[torch.Tensor], cfg: "PruneConfig", levels: dict[str, float],
                timings: dict[str, float],
                resume: Callable[[str], LayerRecord | None] | None = None) -> list[LayerRecord]:
    """Solve a stage's layers on its (already pruned upstream) inputs, in place.

    With ``true_sequential`` the layers are taken in model order and each is calibrated after the ones
    before it in the block were pruned (so fc2 sees the pruned fc1's outputs); otherwise all layers are
    calibrated once on the dense block.  One block forward per layer buys the more faithful inputs.
    Both engines' sequential mode runs it (a Ray actor on each of its own stages).

    ``resume(name)``: a layer's result written earlier (it sets the layer's weights), or None; it is asked where
    the layer's solve would run, after the calibration the solve would have used, so the layers after it see what
    they saw in the first run.
    """
    records = []
    pending = dict(stage.layers)
    while pending:
        batch = list(pending)[:1] if cfg.true_sequential else list(pending)
        start = time.perf_counter()
        accs = collect_hessians(lambda: [stage.run(h) for h in hidden], {n: pending[n] for n in batch},
                                cfg.float64_hessians, float32_products=cfg.hessian_products == "float32")
        timings["calibrate"] += time.perf_counter() - start
        start = time.perf_counter()
        for name in batch:
            module = pending.pop(name)
            record = resume(name) if resume is not None else None
            records.append(record if record is not None else
                           solve_layer(name, stage.name, module, take_curvature(accs.pop(name)), cfg, levels[name]))
        timings["solve"] += time.perf_counter() - start
    return records
