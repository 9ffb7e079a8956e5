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
    """Inside: the model's BatchNorm layers start from empty statistics and average every batch they see with
    equal weight (momentum None), in train mode; everything else keeps its mode. On exit momentum and mode are
    restored, and layers that never ran get their old statistics back (a Ray actor holds copies of modules
    other actors run). Yields ``{name: layer}``, filled on exit with the layers that ran."""
    layers = {n: m for n, m in model.named_modules() if m in set(batchnorm_layers(model))}
    saved = {n: (m.momentum, m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None})
             for n, m in layers.items()}
    ran: dict[str, nn.Module] = {}
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        yield ran
    finally:
        for n, m in layers.items():
            momentum, training, buffers = saved[n]
            m.momentum = momentum
            m.train(training)
            if int(m.num_batches_tracked) > 0:
                ran[n] = m
            else:
                with torch.no_grad():
                    for k, v in buffers.items():
                        getattr(m, k).copy_(v)


@contextmanager
def unchanged_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside: the model's BatchNorm layers normalise each batch by its own statistics (train mode), as they do
    while measuring, but their running statistics come out as they went in. A batch that a Ray actor has
    measured already, streamed again for a replacement further down the chain, must give the same output and
    must not be counted twice."""
    layers = batchnorm_layers(model)
    saved = [(m, m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None})
             for m in layers]
    try:
        for m in layers:
            m.train()
        yield
    finally:
        with torch.no_grad():
            for m, training, buffers in saved:
                m.train(training)
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


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
