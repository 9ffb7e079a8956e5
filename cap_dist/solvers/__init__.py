"""Layer solvers: pure torch (no Ray, no I/O).  The stable entry point is :func:`prune_layer`.

Example::

    from cap_dist.solvers import HessianAccumulator, prune_layer
    acc = HessianAccumulator(columns=384); acc.add_linear_input(x)        # x: [..., 384]
    res = prune_layer(layer.weight, acc.hessian(), method="cap", sparsity=0.5, block_size=128)
    layer.weight.data = res.weight
"""

from __future__ import annotations

import time

import torch

from cap_dist.solvers import baselines
from cap_dist.solvers.cap import cap_activation, cap_fisher
from cap_dist.solvers.curvature import FisherAccumulator, HessianAccumulator
from cap_dist.solvers.numerics import check_weight_hessian, layer_energy, quadratic_loss
from cap_dist.solvers.patterns import (LossCurve, Pattern, allocate_global, allocate_uniform, check_divisible,
                                       check_sparsity, is_valid_n_m, parse_pattern)
from cap_dist.solvers.result import LayerResult

METHODS = ("cap", "sparsegpt", "obs", "wanda", "magnitude")
DEFAULT_CAP_BLOCK = 128
"""The block size recipes use for `cap` unless they say otherwise (see bench/solvers.py for why)."""
DEFAULT_SPARSEGPT_BLOCK = 128

__all__ = ["DEFAULT_CAP_BLOCK", "METHODS", "FisherAccumulator", "HessianAccumulator", "LayerResult", "LossCurve", "Pattern",
           "allocate_global", "allocate_uniform", "is_valid_n_m", "parse_pattern", "prune_layer"]


def _check_prior(prior_mask: torch.Tensor | None, weight: torch.Tensor, sparsity: float, pat: Pattern,
                 fisher: bool) -> torch.Tensor | None:
    """The prior mask as bool on the weight's device, or None when nothing is pruned yet."""
    if prior_mask is None:
        return None
    if tuple(prior_mask.shape) != tuple(weight.shape):
        raise ValueError(f"prior_mask has shape {tuple(prior_mask.shape)}; the weight is {tuple(weight.shape)}")
    prior = prior_mask.to(device=weight.device, dtype=torch.bool)
    if not bool(prior.any()):
        return None
    if fisher:
        raise ValueError(f"{int(prior.sum())} weights are already zero and must stay pruned (prior_mask), which "
                         "needs activation curvature: set prune.curvature=activations, or prune.keep_zeros=false "
                         "to let Fisher curvature treat them as ordinary weights")
    fraction = float(prior.float().mean())
    if not pat.structured and fraction > sparsity + 1e-9:
        raise ValueError(f"{fraction:.2%} of the weights are already pruned, more than the target "
                         f"sparsity={sparsity:.2%}; gradual pruning only adds zeros")
    return prior


def prune_layer(weight: torch.Tensor, hessian: torch.Tensor, *, method: str, sparsity: float,
                pattern: str | Pattern = "unstructured", block_size: int | None = None, damp: float = 0.01,
                backend: str = "auto", max_row_sparsity: float | None = None,
                prior_mask: torch.Tensor | None = None) -> LayerResult:
    """Prune one layer.

    Args:
        weight: ``[out, in]`` (a Conv2d weight flattened to ``[out, in·kh·kw]``).
        hessian: input Hessian ``[in, in]`` (H = 2/N Σ x xᵀ), or Fisher blocks ``[numel/B, B, B]``.
        method: ``cap``, ``sparsegpt``, ``obs``, ``wanda`` or ``magnitude``.
        sparsity: fraction of weights removed, in [0, 1) (ignored for N:M, which fixes it).
        pattern: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive inputs).
        block_size: ``cap``: columns per block (None = whole rows, exact OBC); ``sparsegpt``: lazy
            batch size (None = 128).  Fisher curvature takes its block size from ``hessian``.
        damp: relative damping per input, H_ii ← H_ii·(1 + damp) + damp·1e-4·mean(diag H).
        backend: ``cap`` inner loop: ``auto`` (numba on CPU, torch elsewhere), ``numba``, ``torch``.
        max_row_sparsity: ``cap``: deepest fraction of a block any row may lose (the greedy's early
            stop; default halfway between the target and 1).
        prior_mask: bool ``[out, in]``, True where a weight is already pruned and must stay pruned (the
            masks of earlier steps of gradual pruning). Every method removes these first; the target
            ``sparsity`` must be at least their fraction.

    Returns:
        A :class:`LayerResult` on the device of ``weight``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise TypeError("weight and hessian must be torch tensors")
    check_weight_hessian(weight, hessian)
    pat = parse_pattern(pattern)
    sparsity = pat.sparsity if pat.structured else check_sparsity(sparsity)
    check_divisible(weight.shape[1], pat)
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size={block_size} must be a positive integer or None (whole rows)")
    if hessian.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but hessian on {hessian.device}; put both on one device")
    fisher = hessian.ndim == 3
    prior = _check_prior(prior_mask, weight, sparsity, pat, fisher)
    start = time.perf_counter()
    if method == "cap":
        if fisher:
            out = cap_fisher(weight, hessian, sparsity, pat, damp, backend, max_row_sparsity)
        else:
            out = cap_activation(weight, hessian, sparsity, pat, block_size, damp, backend, max_row_sparsity,
                                 prior)
    elif method == "sparsegpt":
        out = baselines.sparsegpt(weight, hessian, sparsity, pat, damp, block_size or DEFAULT_SPARSEGPT_BLOCK,
                                  prior)
    elif method == "obs":
        out = baselines.obs_oneshot(weight, hessian, sparsity, pat, damp, prior)
    elif method == "wanda":
        out = baselines.wanda(weight, hessian, sparsity, pat, prior)
    else:
        out = baselines.magnitude(weight, sparsity, pat, prior)
    if prior is not None and bool((out["mask"] & prior).any()):
        raise RuntimeError(f"{method} kept {int((out['mask'] & prior).sum())} weights that were already pruned; "
                           "this is a bug in cap-dist, please report it")
    seconds = time.perf_counter() - start
    pruned = out["weight"].to(weight.dtype)
    exact = torch.float64 if weight.dtype == torch.float64 else torch.float32
    h = hessian.to(exact)
    loss = quadratic_loss(pruned.to(exact) - weight.to(exact), h)
    energy = layer_energy(weight.to(exact), h)
    curve = out["curve"].curve(energy) if out["curve"] is not None else None
    info = dict(out["info"], method=method, pattern=str(pat), seconds=seconds,
                curvature="fisher" if fisher else "activations")
    return LayerResult(weight=pruned, mask=out["mask"], losses=out["losses"].to(weight.dtype), loss=loss,
                       energy=energy, curve=curve, removal_step=out.get("removal_step"), info=info)
