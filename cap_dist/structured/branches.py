"""Removing a whole residual branch: the exact constant that replaces it and the loss that costs.

A pre-norm ViT block adds ``ls(module(norm(x)))`` to its stream. With every group of the module removed, the best
constant to add instead (least squares over the calibration tokens) is the branch's mean output,
``c = W·μ + b`` with μ the consumer layer's mean input, and the consumer's loss is then what the centred inputs
carried: ``‖W(X − μ1ᵀ)‖²/N = ‖WX‖²/N − ‖Wμ‖²``. Divided by the layer's energy ``‖WX‖²/N`` that is the last point
of the structure's relative loss curve; the greedy's points before it keep the bias as it is, so a branch whose
output is mostly its mean can cost less removed whole than nearly whole — the allocation sees both.

    means = input_means(run, {"blocks.0.attn.proj": proj})      # cap_dist.models.capture
    c = branch_constant(proj.weight, proj.bias, means["blocks.0.attn.proj"])
"""

from __future__ import annotations

import torch


def branch_constant(weight: torch.Tensor, bias: torch.Tensor | None, mean_input: torch.Tensor) -> torch.Tensor:
    """``W·μ + b``: the branch's mean output, the least-squares constant that replaces it (float64)."""
    out = weight.detach().double() @ mean_input.double()
    return out + bias.detach().double() if bias is not None else out


def branch_relative_loss(weight: torch.Tensor, hessian: torch.Tensor, mean_input: torch.Tensor) -> float:
    """``1 − ‖Wμ‖² / (‖WX‖²/N)`` for H = 2/N·XXᵀ: the consumer's relative loss with the branch replaced by its
    mean output (0 when the output is constant, 1 when its mean is 0)."""
    w = weight.detach().double()
    energy = 0.5 * float(((w @ hessian.double()) * w).sum())
    if energy <= 0:
        return 0.0
    return max(0.0, 1.0 - float((w @ mean_input.double()).pow(2).sum()) / energy)
