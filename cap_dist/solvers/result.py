"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cap_dist.solvers.patterns import LossCurve


@dataclass
class LayerResult:
    """The pruned layer.

    Attributes:
        weight: pruned weight, same shape and dtype as the input weight; zero exactly where ``mask`` is False
            or the dense weight was 0 (so ``weight != 0`` recovers the mask; see ``keep_kept_nonzero``).
        mask: bool, True = kept.
        losses: same shape as ``weight``; at each pruned position the removal loss the method
            charged for that weight (CAP: the exact greedy OBS increment; baselines: their
            saliency), 0 where kept.  Summed, CAP's losses equal ``loss`` up to damping.
        loss: the exact increase of the layer objective, ½·tr(δW H δWᵀ) = ‖(W−Ŵ)X‖²/N on the
            undamped curvature given.
        energy: ½·tr(W H Wᵀ), the dense layer's objective (so ``loss / energy`` is relative error).
        curve: removal loss as a function of sparsity, for allocation across layers (None where
            the method or pattern offers no curve).
        removal_step: ``cap`` only: for every pruned weight the greedy step (within its block and
            row) at which it was removed, −1 where kept; with ``losses`` this is the trace that
            lets a caller replay the greedy to another depth.
        info: damping used, Cholesky escalations, dead inputs, block size, backend, timings.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    losses: torch.Tensor
    loss: float
    energy: float
    curve: LossCurve | None = None
    removal_step: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())

    @property
    def relative_error(self) -> float:
        return self.loss / self.energy if self.energy > 0 else float("nan")
