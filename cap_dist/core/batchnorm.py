"""BatchNorm re-estimation after pruning (as OBC does): the pruned layers change the statistics the BatchNorm
layers after them see, while their running mean and variance still describe the dense model's activations.
One pass over the calibration images with the BatchNorm layers measuring (train mode, cumulative average)
replaces them with the pruned model's own statistics.

Only the BatchNorm layers are put in train mode: dropout and stochastic depth stay off, so the pass is
deterministic.  The pass runs stage by stage (:func:`cap_dist.core.run_stages`), so the local engine (one
process, every stage) and the Ray engine (each actor its shard, batches streamed through the chain in the same
order) perform the same operations in the same order and end with the same statistics.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from cap_dist.core.stages import Stage, run_stages


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics and hold real (not meta) buffers."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_mean.device.type != "meta"]


@contextmanager
def measuring_batchnorm(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Inside: each of the model's BatchNorm layers, when it first runs, restarts from empty statistics and then
    averages every batch it sees with equal weight (momentum None), in train mode; everything else keeps its
    mode. Layers that never run keep their statistics (a Ray actor holds copies of modules other actors run).
    On exit momentum and mode are restored. Yields ``{name: layer}`` of the layers that ran, filled as they do."""
    names = {m: n for n, m in model.named_modules()}
    layers = batchnorm_layers(model)
    saved = [(m, m.momentum, m.training) for m in layers]
    ran: dict[str, nn.Module] = {}

    def restart(module: nn.Module, _args: tuple) -> None:
        if names[module] not in ran:
            module.reset_running_stats()
            ran[names[module]] = module

    handles = [m.register_forward_pre_hook(restart) for m in layers]
    try:
        for m in layers:
            m.momentum = None
            m.train()
        yield ran
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)


def measured_keys(ran: dict[str, nn.Module]) -> list[str]:
    """The state-dict keys of the statistics of these (re-estimated) BatchNorm layers."""
    return [f"{name}.{buffer}" for name, m in ran.items() for buffer, value in m.named_buffers(recurse=False)
            if value is not None]


def reestimate_batchnorm(model: nn.Module, stages: list[Stage], batches: list[torch.Tensor]) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers on ``batches`` (run through
    ``stages``, the model's own split); returns how many layers were re-estimated (those that ran)."""
    if not batchnorm_layers(model):
        return 0
    with measuring_batchnorm(model) as ran, torch.no_grad():
        for x in batches:
            run_stages(stages, x)
    return len(ran)
