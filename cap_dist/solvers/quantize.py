"""Weight quantization of a (pruned) layer onto an integer grid: GPTQ with OBS error compensation, and
round-to-nearest (RTN) as the baseline.  Pure torch, no I/O.

    from cap_dist.solvers.quantize import quantize_layer
    res = prune_layer(w, h, method="cap", sparsity=0.5, block_size=128)
    q = quantize_layer(res.weight, h, bits=4, group_size=128, mask=res.mask)
    layer.weight.data = q.weight          # == q.codes × q.scales exactly; zeros wherever res.mask is False

The grid.  Weights of a row are quantized per group of ``group_size`` consecutive input columns (``None``:
the whole row is one group, per output channel), each group with its own float32 scale s:
  symmetric (default): c ∈ [−(2^(b−1)−1), 2^(b−1)−1],   ŵ = c·s,       s = max|w| / (2^(b−1)−1)
  asymmetric:          c ∈ [0, 2^b−1], zero point z,   ŵ = (c−z)·s,   s = (max(w,0) − min(w,0)) / (2^b−1)
where max/min run over the group's *kept* weights (a group with no nonzero kept weight gets s = 1).  The
dequantized weight is the exact product (computed in float64, where a code of at most 9 bits (c − z) times a
float32 is exact) rounded once to the weight's dtype, so for float32 weights ŵ = fl32(c·s) bit for bit.

GPTQ (Frantar et al. 2022), act-order off.  With UᵀU = (damped H)⁻¹ (upper Cholesky), the columns are fixed
left to right; fixing column j to its grid value q_j leaves the error e = (w_j − q_j)/U_jj, which the free
columns absorb optimally by
    W[:, j+1:] −= e · U[j, j+1:]                                                              (1)
(in blocks of ``block_size`` columns, later blocks updated lazily: W[:, later] −= E · U[block, later]).
A group's scale is taken from the group's current (already compensated) weights when the sweep enters it;
blocks are widened to a multiple of ``group_size`` so that a group never straddles two blocks.

Pruned weights (``mask`` False) are fixed at 0, with code 0.  Like SparseGPT's joint sparsify-and-quantize
sweep, a pruned weight in a later column may absorb compensation through (1) while it is still free; when the
sweep reaches its column it is fixed to exactly 0 and the error of doing so, e = (w_j − 0)/U_jj, is carried
on through (1) like any other — so no pruned weight is ever revived and none of the compensation is lost
silently.  The exactly constrained OBS update would instead use, per row, the inverse of H restricted to the
row's kept inputs (a different U per row: O(rows·in³)); SparseGPT's shared U is the standard trade-off and
what this module implements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cap_dist.solvers.numerics import (check_weight_hessian, inverse_factor, layer_energy,
                                       quadratic_loss)

MIN_BITS, MAX_BITS = 2, 8
DEFAULT_BLOCK = 128
METHODS = ("gptq", "rtn")


@dataclass
class QuantResult:
    """A quantized layer.

    Attributes:
        weight: dequantized weight, same shape and dtype as the input; exactly 0 where ``mask`` is False.
        codes: integer levels, ``[out, in]``: int8 (symmetric) or uint8 (asymmetric); 0 at pruned positions.
        scales: float32 ``[out, n_groups]``.
        zero_points: uint8 ``[out, n_groups]`` (asymmetric), else None.
        bits: bits per code.
        group_size: input columns per scale (None: one scale per output row).
        mask: bool ``[out, in]``, True = kept (all True when no mask was given).
        loss: ½·tr(δW H δWᵀ) for δW = weight − input weight (the quantization's own increase of the layer
            objective, on the undamped H given; NaN when no curvature was given to RTN).
        energy: ½·tr(W H Wᵀ) of the input weight (so ``loss / energy`` is the relative error).
        info: method, damping used, Cholesky escalations, codes clamped to the grid's ends, seconds.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int | None
    mask: torch.Tensor
    loss: float
    energy: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def relative_error(self) -> float:
        return self.loss / self.energy if self.energy > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------
# The grid


def level_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) code: [−(2^(b−1)−1), 2^(b−1)−1] symmetric, [0, 2^b−1] asymmetric."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2 ** bits - 1


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """ŵ = (c − z)·s for codes ``[out, in]`` and per-group ``[out, n_groups]`` scales (and zero points).

    The product is exact in float64 (≤ 9-bit integer × float32) and rounded once to ``dtype``: the one
    definition the quantizer, the pipeline and the compact loader share, so all three agree bit for bit.
    """
    rows, cols = codes.shape
    group = cols // scales.shape[1]
    levels = codes.to(torch.float64)
    if zero_points is not None:
        levels = levels - zero_points.to(torch.float64).repeat_interleave(group, dim=1)
    return (levels * scales.to(torch.float64).repeat_interleave(group, dim=1)).to(dtype)


def _group_scales(w: torch.Tensor, keep: torch.Tensor, bits: int,
                  symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero point of each row of ``w`` [rows, width] over its kept entries."""
    kept = w * keep
    lo, hi = level_range(bits, symmetric)
    if symmetric:
        amax = kept.abs().amax(dim=1)
        scale = (amax / hi).to(torch.float32)
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    xmin = kept.amin(dim=1).clamp(max=0)
    xmax = kept.amax(dim=1).clamp(min=0)
    span = xmax - xmin
    scale = (span / hi).to(torch.float32)
    scale = torch.where(span > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale.to(w.dtype)).clamp(lo, hi)
    zero = torch.where(span > 0, zero, torch.full_like(zero, (hi + 1) // 2))
    return scale, zero.to(torch.uint8)


def _to_codes(w: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bits: int) -> torch.Tensor:
    """Nearest codes of ``w`` [rows, width] under per-row ``scale`` (and ``zero``); 0 where not kept.
    Returned as int16 (wide enough for both grids); the caller narrows it."""
    lo, hi = level_range(bits, zero is None)
    levels = torch.round(w / scale.to(w.dtype).unsqueeze(1))
    if zero is not None:
        levels = levels + zero.to(w.dtype).unsqueeze(1)
    return torch.where(keep, levels.clamp(lo, hi), torch.zeros_like(levels)).to(torch.int16)


def _levels_value(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  work: torch.dtype) -> torch.Tensor:
    """The grid value of codes [rows, width] in the working dtype (for the error, not the output)."""
    levels = codes.to(work)
    if zero is not None:
        levels = levels - zero.to(work).unsqueeze(1)
    return levels * scale.to(work).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------
# Checks


def _check_arguments(weight: torch.Tensor, bits: int, group_size: int | None, mask: torch.Tensor | None,
                     block_size: int) -> torch.Tensor:
    """Validate; return the keep-mask (all True when none given)."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in] (flatten Conv2d weights to [out, in*kh*kw]), "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is outside [{MIN_BITS}, {MAX_BITS}] (8 and 4 are the usual choices)")
    cols = weight.shape[1]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r} must be a positive integer or None (one scale per row)")
        if cols % group_size:
            raise ValueError(f"group_size={group_size} does not divide the layer's {cols} input columns; "
                             f"choose a divisor of {cols} or None (one scale per row)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    if mask is None:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; the weight is {tuple(weight.shape)} "
                         "(it must be the layer's keep-mask, True = kept)")
    keep = mask.to(device=weight.device, dtype=torch.bool)
    if bool((weight.masked_select(~keep) != 0).any()):
        raise ValueError(f"{int((weight.masked_select(~keep) != 0).sum())} weights outside the mask are not "
                         "zero: quantize the pruned weight (mask False must mean the weight is 0)")
    return keep


def _result(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            keep: torch.Tensor, bits: int, group_size: int | None, hessian: torch.Tensor | None,
            info: dict[str, Any]) -> QuantResult:
    """Dequantize, measure the loss on the undamped curvature, and pack the result."""
    q = dequantize(codes, scales, zeros, weight.dtype)
    q = torch.where(keep, q, torch.zeros_like(q))                  # exactly +0 where pruned, whatever z is
    loss = energy = float("nan")
    if hessian is not None:
        exact = torch.float64 if weight.dtype == torch.float64 else torch.float32
        h = hessian.to(exact)
        loss = quadratic_loss(q.to(exact) - weight.to(exact), h)
        energy = layer_energy(weight.to(exact), h)
    narrow = torch.int8 if zeros is None else torch.uint8
    return QuantResult(weight=q, codes=codes.to(narrow), scales=scales, zero_points=zeros, bits=bits,
                       group_size=group_size, mask=keep, loss=loss, energy=energy, info=info)


# ----------------------------------------------------------------------------------------------------
# Round to nearest


def quantize_rtn(weight: torch.Tensor, hessian: torch.Tensor | None = None, *, bits: int,
                 group_size: int | None = None, symmetric: bool = True,
                 mask: torch.Tensor | None = None) -> QuantResult:
    """Round every kept weight to the nearest level of its group's grid, with no compensation.

    ``hessian`` ([in, in], or Fisher blocks) is only used to report the loss.  Same grid, same mask rule
    as :func:`quantize_layer`: pruned weights are 0 with code 0.
    """
    keep = _check_arguments(weight, bits, group_size, mask, DEFAULT_BLOCK)
    if hessian is not None:
        check_weight_hessian(weight, hessian)
    start = time.perf_counter()
    rows, cols = weight.shape
    width = group_size or cols
    n_groups = cols // width
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(work).reshape(rows * n_groups, width)                # one row per (row, group)
    k = keep.reshape(rows * n_groups, width)
    scale, zero = _group_scales(w, k, bits, symmetric)
    codes = _to_codes(w, k, scale, zero, bits).reshape(rows, cols)
    scales = scale.reshape(rows, n_groups)
    zeros = zero.reshape(rows, n_groups) if zero is not None else None
    info = dict(method="rtn", seconds=time.perf_counter() - start)
    return _result(weight, codes, scales, zeros, keep, bits, group_size, hessian, info)


# ----------------------------------------------------------------------------------------------------
# GPTQ


def _sweep_width(block_size: int, group_size: int | None) -> int:
    """Columns per lazy block: ``block_size`` rounded up to a multiple of ``group_size``, so a group's
    scale is always taken from fully compensated weights (the block holds them; blocks only trade speed)."""
    if group_size is None:
        return block_size
    return -(-block_size // group_size) * group_size


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None = None,
                   symmetric: bool = True, damp: float = 0.01, block_size: int = DEFAULT_BLOCK,
                   mask: torch.Tensor | None = None) -> QuantResult:
    """Quantize a (pruned) layer with GPTQ, keeping every pruned weight at exactly 0.

    Args:
        weight: ``[out, in]``; zero wherever ``mask`` is False.
        hessian: input Hessian ``[in, in]`` (H = 2/N Σ x xᵀ).
        bits: bits per code, 2..8.
        group_size: input columns per scale (must divide ``in``); None = one scale per output row.
        symmetric: symmetric grid around 0 (no zero point) or asymmetric with a zero point per group.
        damp: relative damping per input, as in :func:`cap_dist.solvers.prune_layer`.
        block_size: columns per lazy-update block (speed only; widened to a multiple of ``group_size``).
        mask: bool ``[out, in]``, True = kept (None: every weight is kept).

    Returns:
        A :class:`QuantResult` on the device of ``weight``.
    """
    keep = _check_arguments(weight, bits, group_size, mask, block_size)
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2:
        raise ValueError("GPTQ needs input-activation curvature (an [in, in] Hessian), not Fisher blocks: "
                         "use prune.curvature=activations, or prune.quantize.method=rtn")
    check_weight_hessian(weight, hessian)
    if hessian.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but hessian on {hessian.device}; put both on one device")
    start = time.perf_counter()
    rows, cols = weight.shape
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, fac = inverse_factor(hessian, damp, work)                           # UᵀU = H⁻¹
    w = weight.to(work).clone()
    width = group_size or cols
    n_groups = cols // width
    scales = torch.ones(rows, n_groups, dtype=torch.float32, device=weight.device)
    zeros = None if symmetric else torch.zeros(rows, n_groups, dtype=torch.uint8, device=weight.device)
    if group_size is None:                                                # per channel: from the input rows
        scales[:, 0], z = _group_scales(w, keep, bits, symmetric)
        if zeros is not None:
            zeros[:, 0] = z
    codes = torch.zeros(rows, cols, dtype=torch.int16, device=weight.device)
    block = _sweep_width(block_size, group_size)
    for j0 in range(0, cols, block):
        j1 = min(j0 + block, cols)
        w1 = w[:, j0:j1].clone()                                          # [rows, b], current weights
        u1 = u[j0:j1, j0:j1]
        err = torch.zeros_like(w1)
        for i in range(j1 - j0):
            j = j0 + i
            g = j // width
            if group_size is not None and j % group_size == 0:            # entering a group: its scale now
                scales[:, g], z = _group_scales(w1[:, i:i + group_size], keep[:, j:j + group_size], bits,
                                                symmetric)
                if zeros is not None:
                    zeros[:, g] = z
            zg = zeros[:, g] if zeros is not None else None
            col = w1[:, i:i + 1]
            c = _to_codes(col, keep[:, j:j + 1], scales[:, g], zg, bits)  # 0 where pruned
            q = torch.where(keep[:, j:j + 1], _levels_value(c, scales[:, g], zg, work), torch.zeros_like(col))
            e = (col[:, 0] - q[:, 0]) / u1[i, i]                          # e = (w_j − q_j) / U_jj
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)          # (1) inside the block
            codes[:, j] = c[:, 0]
            err[:, i] = e
        w[:, j1:] -= err @ u[j0:j1, j1:]                                  # (1) lazily, for later blocks
    lo, hi = level_range(bits, symmetric)
    clamped = int(((codes == lo) | (codes == hi)).logical_and(keep).sum())
    info = dict(method="gptq", damp_used=fac.damp_used, escalations=fac.escalations, dead_inputs=fac.dead_inputs,
                block_size=block, codes_at_grid_ends=clamped, seconds=time.perf_counter() - start)
    return _result(weight, codes, scales, zeros, keep, bits, group_size, hessian, info)


def quantize(weight: torch.Tensor, hessian: torch.Tensor, *, method: str, bits: int, group_size: int | None,
             symmetric: bool, mask: torch.Tensor | None, damp: float = 0.01,
             block_size: int = DEFAULT_BLOCK) -> QuantResult:
    """:func:`quantize_layer` (``method="gptq"``) or :func:`quantize_rtn` (``"rtn"``) with one signature,
    for callers that take the method from a recipe."""
    if method == "gptq":
        return quantize_layer(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, damp=damp,
                              block_size=block_size, mask=mask)
    if method == "rtn":
        return quantize_rtn(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, mask=mask)
    raise ValueError(f"quantization method={method!r} is not one of {', '.join(METHODS)}")
