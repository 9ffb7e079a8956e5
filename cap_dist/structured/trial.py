"""The whole model's output error under a structured allocation, on the calibration images, without committing to it.

A layer's loss ‖(Ŵ−W)X‖² says how much one consumer's output moves, not what that costs the model: on a CNN a
BatchNorm rescales every output channel after the consumer, a residual sum dilutes the branch, and an error in an
early block passes through every later one. Structured pruning can be tried cheaply on the whole model instead:
removing a group is exactly zeroing its consumer columns (the producer's rows feed nothing else), so an allocation
is tried by writing each consumer's re-solved weight with the removed columns at zero, running the calibration
images and putting the original weights back. :mod:`cap_dist.structured.prune` does it once per structure (to
express every layer's loss curve in the units of the model's output error) and once per candidate allocation (to
keep the best).

    probe = OutputProbe(model, inputs, "classifier")
    with trial_weights(consumers, {"blocks.3.conv_pwl": pruned_2d}):
        error = probe.error()                    # mean KL(dense ‖ pruned) per calibration image
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cap_dist.models.capture import flattened_weight, set_flattened_weight
from cap_dist.models.kind import ModelKind

OutputKind = ModelKind


def output_error(out: torch.Tensor, dense: torch.Tensor, kind: OutputKind) -> float:
    """The summed error of a batch of outputs against the dense model's, in float64.

    ``classifier``: Σ_rows KL(softmax(dense) ‖ softmax(out)) (what top-1 and distillation follow);
    ``encoder``: Σ_rows ‖out − dense‖² / ‖dense‖² (relative squared error of each embedding).
    """
    if out.shape != dense.shape:
        raise ValueError(f"pruned output {tuple(out.shape)} and dense output {tuple(dense.shape)} differ")
    out, dense = out.double().reshape(out.shape[0], -1), dense.double().reshape(dense.shape[0], -1)
    if kind == "classifier":
        log_dense, log_out = F.log_softmax(dense, dim=1), F.log_softmax(out, dim=1)
        return float((log_dense.exp() * (log_dense - log_out)).sum())
    if kind == "encoder":
        return float(((out - dense).pow(2).sum(1) / dense.pow(2).sum(1).clamp_min(1e-300)).sum())
    raise ValueError(f"output kind {kind!r} is not 'classifier' or 'encoder'")


def first_images(inputs: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` images of a list of batches, in the same batches (the last one cut short): a probe on a
    subset of the calibration images, for steps that need many passes."""
    if count < 1:
        raise ValueError(f"a probe needs at least one image, not {count}")
    out, left = [], count
    for x in inputs:
        if left <= 0:
            break
        out.append(x[:left])
        left -= int(out[-1].shape[0])
    return out


class OutputProbe:
    """The dense model's outputs on the calibration inputs, kept, and the mean error of the model's current
    outputs against them (:func:`output_error` per image)."""

    def __init__(self, model: nn.Module, inputs: list[torch.Tensor], kind: OutputKind) -> None:
        if not inputs:
            raise ValueError("the output probe needs at least one calibration batch")
        self.model, self.inputs, self.kind = model, inputs, kind
        self.dense = self._outputs()
        self.images = sum(int(x.shape[0]) for x in inputs)

    def _outputs(self) -> list[torch.Tensor]:
        with torch.no_grad():
            outs = [self.model(x) for x in self.inputs]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(f"{type(self.model).__name__} must return a tensor to compare structured allocations; "
                            "use structured.allocation: global or uniform for this model")
        return outs

    def error(self) -> float:
        """Mean output error per calibration image of the model as it is now."""
        return sum(output_error(o, d, self.kind) for o, d in zip(self._outputs(), self.dense)) / self.images

    def constant_error(self) -> float:
        """Mean output error per image of a model that ignores its input and outputs the same thing for every
        image, the best such (the dense outputs' mean probabilities for a classifier, their mean embedding for an
        encoder). An allocation no better than this has lost the model: it cannot tell images apart."""
        dense = torch.cat([d.double().reshape(d.shape[0], -1) for d in self.dense])
        if self.kind == "classifier":
            log_p = F.log_softmax(dense, dim=1)
            log_mean = torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(dense.shape[0])
            return float((log_p.exp() * (log_p - log_mean)).sum()) / self.images
        mean = dense.mean(0, keepdim=True)
        return float(((dense - mean).pow(2).sum(1) / dense.pow(2).sum(1).clamp_min(1e-300)).sum()) / self.images


@contextmanager
def trial_weights(consumers: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor],
                  constants: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Write the flattened ``[out, in]`` ``weights`` into the named consumers for the ``with`` body, then put the
    original weights back (also when the body raises). A consumer named in ``constants`` outputs that vector
    (broadcast over its tokens) instead: a removed branch's mean output."""
    constants = constants or {}
    unknown = (set(weights) | set(constants)) - set(consumers)
    if unknown:
        raise KeyError(f"no consumer layer named {sorted(unknown)[:3]}")
    saved = {name: flattened_weight(consumers[name]).clone() for name in weights}
    handles = [consumers[name].register_forward_hook(
        lambda mod, args, out, c=c: c.to(out.dtype).expand_as(out)) for name, c in constants.items()]
    try:
        for name, w in weights.items():
            set_flattened_weight(consumers[name], w)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, w in saved.items():
            set_flattened_weight(consumers[name], w)
