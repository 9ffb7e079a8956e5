"""The solvers' large float32 products on the CPU through oneDNN, and SPD solves built on them.

ADMM's linear step and the re-solve's conjugate gradients are nearly all [rows, in]·[in, in] products and
triangular solves.  torch sends a float32 ``@`` on the CPU to MKL, which on AMD processors runs its AVX2 code
even where the CPU has AVX-512; torch's bundled oneDNN picks its kernels by instruction set, not by vendor.
Measured on one thread of this project's machines (AMD EPYC, Zen 5): oneDNN 210-240 GFLOP/s against MKL's
108-120 on every shape the solvers use, the same float32 rounding (relative difference to a float64 product
~5e-7 for both).  On Intel CPUs MKL already runs AVX-512 and the two are alike.

:func:`linear` is ``x @ wᵀ`` by that route where it applies (CPU, float32, a weight whose rows or columns are
contiguous: oneDNN's kernel for a weight with padded strides is ~1000× slower, so such a weight is copied
first), else torch's own product.  LAPACK has no oneDNN counterpart: :class:`SpdSolver` turns the two
triangular solves with a Cholesky factor into products by blocks, at the products' speed.

``CAP_DIST_ONEDNN=0`` in the environment (or :func:`use_onednn`) sends everything to torch's product, e.g.
to compare.  The route is checked once per process against torch's product on a small problem; if oneDNN is
missing or disagrees, a warning says so and torch's product is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_state: dict[str, bool | None] = {"enabled": os.environ.get("CAP_DIST_ONEDNN", "1") != "0", "works": None}


def _onednn_works() -> bool:
    """Whether torch's oneDNN linear exists here and agrees with torch's product (checked once)."""
    if _state["works"] is None:
        ok = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                gen = torch.Generator().manual_seed(0)
                x, w = torch.randn(37, 70, generator=gen), torch.randn(53, 70, generator=gen)
                got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                want = x.double() @ w.double().T
                ok = bool(((got.double() - want).norm() / want.norm()) < 1e-5)
                if not ok:
                    log.warning("oneDNN's float32 product disagrees with torch's here; using torch's product")
            except RuntimeError as err:                 # an op that exists but cannot run on this build
                log.warning("oneDNN's float32 product is unavailable (%s); using torch's product", err)
        _state["works"] = ok
    return bool(_state["works"])


def onednn_active() -> bool:
    """Whether :func:`linear` takes the oneDNN route for CPU float32 products in this process."""
    return bool(_state["enabled"]) and _onednn_works()


@contextlib.contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """Within the block, CPU float32 products go through oneDNN (``True``, where it works) or torch (``False``)."""
    before = _state["enabled"]
    _state["enabled"] = enabled
    try:
        yield
    finally:
        _state["enabled"] = before


def _routable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.ndim == 2
            and w.ndim == 2 and x.shape[0] > 0 and x.shape[1] > 0 and w.shape[0] > 0 and x.stride(1) == 1
            and x.stride(0) >= x.shape[1] and onednn_active())            # rows apart, not broadcast


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` for ``x`` [m, k] and ``w`` [n, k]: oneDNN on the CPU in float32 (``x`` may be a column slice of a
    wider matrix; ``w`` should have contiguous rows or columns, or it is copied), else torch's product."""
    if not _routable(x, w):
        return x @ w.T
    if not (w.is_contiguous() or w.T.is_contiguous()):
        w = w.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by :func:`linear` (``b``'s columns are oneDNN's weight rows)."""
    return linear(a, b.T)


SOLVE_BLOCK = 256
"""Columns per block of :class:`SpdSolver` (one thread, 1536×6144: 256 and 512 solve alike, 0.59 / 0.58 s; 256
builds its block weights in half the time)."""


class SpdSolver:
    """``R ↦ R·A⁻¹`` for an SPD ``A``, factored once, for many ``R`` (rows of right-hand sides).

    Through oneDNN (:func:`factor` on a CPU float32 matrix), ``A = LLᵀ`` is factored left-looking by blocks J of
    columns, and with the inverse D_J = L_JJ⁻¹ of each diagonal block (an explicit 256×256 triangle) the two
    substitutions (Y·Lᵀ = R, then X·L = Y) become one product per block:
        Y_J = [Y_{<J}, R_J]·[−D_J·L_{J,<J}, D_J]ᵀ,      X_J = [Y_J, X_{>J}]·[D_J; −L_{>J,J}·D_J]
    whose weights the factorisation builds as it goes.  One thread, 1536×6144: a solve 0.60 s against 1.14 s for
    LAPACK's two triangular solves (relative error to a float64 solve ~2e-6 against 5e-7: float32 rounding
    through the explicit diagonal inverses; ADMM's re-solve after it is exact).  The factor with its block
    weights: 0.62 s against LAPACK's 1.14 s for the factor alone.  Elsewhere (GPU, float64, oneDNN off) it is
    a Cholesky factor and LAPACK's two triangular solves."""

    def __init__(self, factor: torch.Tensor, forward: list[torch.Tensor], backward: list[torch.Tensor],
                 blocks: list[tuple[int, int]]) -> None:
        self.lower = factor
        self.forward = forward
        self.backward = backward
        self.blocks = blocks

    @classmethod
    def factor(cls, matrix: torch.Tensor, block: int = SOLVE_BLOCK,
               reuse: SpdSolver | None = None) -> tuple[SpdSolver | None, int]:
        """Factor ``matrix`` (read from its lower triangle).  Returns the solver and 0, or None and k > 0 where
        the leading minor of order k is not positive definite (as ``torch.linalg.cholesky_ex``'s info).
        ``reuse``: a solver of a matrix of the same shape whose buffers to overwrite (it is invalid after):
        each fresh n×n buffer on a wide layer costs page faults, and ADMM factors every third iteration."""
        n = matrix.shape[-1]
        blocks = [(j, min(j + block, n)) for j in range(0, n, block)]
        if not _routable(matrix, matrix):
            from cap_dist.solvers.numerics import blocked_cholesky   # numerics imports this module
            lower, info = blocked_cholesky(matrix)
            return (None, info) if info else (cls(lower, [], [], blocks), 0)
        same = reuse is not None and reuse.forward and reuse.lower.shape == matrix.shape and reuse.blocks == blocks
        lower = reuse.lower if same else torch.empty_like(matrix)
        forward = reuse.forward if same else [torch.empty(j1 - j0, j1, dtype=matrix.dtype) for j0, j1 in blocks]
        backward = reuse.backward if same else [torch.empty(j1 - j0, n - j0, dtype=matrix.dtype) for j0, j1 in blocks]
        for (j0, j1), fwd, bwd in zip(blocks, forward, backward):
            b = j1 - j0
            panel = lower[j0:j1, :j0].contiguous()                         # L_{J,<J}
            diagonal = matrix[j0:j1, j0:j1] - linear(panel, panel) if j0 else matrix[j0:j1, j0:j1]
            l_jj, info = torch.linalg.cholesky_ex(diagonal)
            if int(info):
                return None, j0 + int(info)
            d = torch.linalg.solve_triangular(l_jj, torch.eye(b, dtype=matrix.dtype), upper=False)   # D_J
            lower[j0:j1, j0:j1] = l_jj
            fwd[:, j0:] = d
            if j0:
                fwd[:, :j0] = linear(d, panel.T).neg_()
            bwd[:, :b] = d.T
            if j1 < n:
                below = matrix[j1:, j0:j1] - linear(lower[j1:, :j0], panel) if j0 else matrix[j1:, j0:j1]
                lower[j1:, j0:j1] = column = linear(below, d)                # below·L_JJ⁻ᵀ
                bwd[:, b:] = linear(d.T.contiguous(), column).neg_()        # (−L_{>J,J}·D_J)ᵀ
        return cls(lower, forward, backward, blocks), 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs·A⁻¹`` (``rhs`` [rows, n]), a new tensor."""
        return self.solve_(rhs.clone(memory_format=torch.contiguous_format))

    def solve_(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs ← rhs·A⁻¹`` in place (``rhs`` [rows, n]; if contiguous, no [rows, n] temporary on the oneDNN
        route: on a 1536×6144 layer each would be a fresh 38 MB mapping, page faults and all); returns ``rhs``."""
        if not (self.forward and _routable(rhs, self.lower)):
            x = torch.linalg.solve_triangular(self.lower.mT, rhs, upper=True, left=False)
            return rhs.copy_(torch.linalg.solve_triangular(self.lower, x, upper=False, left=False))
        if not rhs.is_contiguous():                                        # e.g. a column slice: solve a copy
            return rhs.copy_(self.solve_(rhs.contiguous()))
        for (j0, j1), w in zip(self.blocks, self.forward):
            rhs[:, j0:j1] = linear(rhs[:, :j1], w)
        for (j0, j1), w in zip(reversed(self.blocks), reversed(self.backward)):
            rhs[:, j0:j1] = linear(rhs[:, j0:], w)
        return rhs
