"""CAP's learning-rate schedule: linear warm-up, then linear decay to ``min_lr``, restarted at every pruning
step (so over a gradual run the rate is a saw-tooth: "cyclic linear").

Every finetune run after a pruning step builds its schedule from step 0, which is the restart; the pure
functions below give the multiplier of the peak rate for optimizer step ``k`` (0-based) of a run.

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, warmup, min_lr / lr))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cap_dist.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (the first step already
    moves). Decay: from 1 at ``step = warmup_steps`` linearly towards ``min_ratio``, which it would reach at
    ``step = total_steps``; steps past the end stay at ``min_ratio``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and min_ratio={min_ratio} in [0, 1]")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


def linear_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """:func:`lr_multiplier` as the one-argument function ``LambdaLR`` calls with its step count."""
    lr_multiplier(0, total_steps, warmup_steps, min_ratio)          # validate once, here
    return lambda step: lr_multiplier(step, total_steps, warmup_steps, min_ratio)


def cyclic_lr_multiplier(global_step: int, steps_per_cycle: int, warmup_steps: int = 0,
                         min_ratio: float = 0.0) -> float:
    """The multiplier over a whole gradual run in which every pruning step trains ``steps_per_cycle`` steps:
    the linear schedule restarted at each cycle (for plots and for checking a gradual run's log)."""
    if steps_per_cycle <= 0:
        raise ValueError(f"steps_per_cycle={steps_per_cycle} must be positive")
    return lr_multiplier(global_step % steps_per_cycle, steps_per_cycle, warmup_steps, min_ratio)


def schedule_sparsities(schedule: "ScheduleConfig", final: float) -> list[float]:
    """The target sparsity of every pruning step, increasing, ending at ``final``."""
    if not schedule.start < final:
        raise ValueError(f"schedule.start={schedule.start} must be below the final sparsity {final}")
    if schedule.first is not None and not schedule.start < schedule.first <= final:
        raise ValueError(f"schedule.first={schedule.first} must lie in ({schedule.start}, {final}]")
    if schedule.steps == 1:
        return [round(final, 6)]
    anchor, head, n = schedule.start, [], schedule.steps
    if schedule.first is not None:
        anchor, head, n = schedule.first, [schedule.first], schedule.steps - 1
    steps = []
    for k in range(1, n + 1):
        frac = k / n
        if schedule.curve == "cubic":
            steps.append(final + (anchor - final) * (1.0 - frac) ** 3)
        else:
            steps.append(anchor + (final - anchor) * frac)
    steps[-1] = final
    return [round(s, 6) for s in head + steps]
