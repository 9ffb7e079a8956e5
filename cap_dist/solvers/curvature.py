"""Curvature for layer-wise pruning: input Hessians (X Xᵀ) and CAP's block empirical Fisher.

Both accumulators stream: they hold a running *sum* and a *count*, never the samples, so a
worker can fold in calibration batches as they pass, and partial accumulators from many
workers combine exactly with :meth:`merge` (sum of sums, sum of counts).

Input Hessian of a linear layer y = W x (the layer-wise squared error ‖(W − Ŵ)X‖²/N):
    H = 2/N · Σ_n x_n x_nᵀ                      (Linear: every token is a sample;
                                                 Conv2d: every unfolded patch is a sample)
Block empirical Fisher (CAP, WoodFisher/oBERT): the flattened weight is cut into blocks of B
contiguous weights, and each block gets its own
    F_b = 1/N · Σ_n g_{n,b} g_{n,b}ᵀ            (g_n: per-sample gradient of the loss)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cap_dist.solvers.numerics import SYMMETRIC_BLOCK, add_lower_gram, mirror_lower


def _accumulation_dtype(float64: bool) -> torch.dtype:
    return torch.float64 if float64 else torch.float32


_CHUNK_BYTES = 16 * 2**20     # the most of one batch's layer inputs converted at once in add_rows
_MIN_CHUNK_ROWS = 256         # below this the rank-k updates lose GEMM efficiency
# Samples per float32 product: each product's rounding grows with the number of terms it sums, while the
# float64 running sum takes the products without further loss (bench/hessian_precision.py measures the error).
FLOAT32_PRODUCT_ROWS = 1024


@dataclass
class HessianAccumulator:
    """Streaming H = 2/N Σ x xᵀ for one Linear or Conv2d layer.

    Args:
        columns: input width of the flattened weight (``in`` for Linear, ``in·kh·kw`` for Conv2d).
        float64: accumulate in float64 (recommended for long calibration runs).
        device: where the running sum lives.
        float32_products: with a float64 sum, form each chunk's X Xᵀ in float32 (at most
            :data:`FLOAT32_PRODUCT_ROWS` samples per product) and add it to the float64 sum: float32 GEMMs run at
            twice the CPU rate and far faster on GPUs, and H stays within 1e-6 relative of all-float64 on
            every real layer measured (worst 6.4e-7; bench/hessian_precision.py).
    """

    columns: int
    float64: bool = False
    device: torch.device | str = "cpu"
    float32_products: bool = False

    def __post_init__(self) -> None:
        if self.columns <= 0:
            raise ValueError(f"columns={self.columns} must be positive")
        self.sum = torch.zeros(self.columns, self.columns, dtype=_accumulation_dtype(self.float64),
                               device=self.device)
        self.count = 0
        self._mirrored = True

    def add_rows(self, rows: torch.Tensor) -> None:
        """Fold in samples given as rows: ``[samples, columns]``."""
        if rows.ndim != 2 or rows.shape[1] != self.columns:
            raise ValueError(f"expected samples of shape [N, {self.columns}], got {tuple(rows.shape)}")
        # Converted to the sum's precision a slice at a time: a float64 copy of a whole batch of tokens
        # (1576 × 3072 for one ViT-B batch of 8) is a transient as large as a Hessian, for no gain in speed.
        if self.float32_products and self.sum.dtype == torch.float64:
            dtype, step = torch.float32, FLOAT32_PRODUCT_ROWS
        else:
            dtype = self.sum.dtype
            step = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (self.columns * self.sum.element_size()))
        banded = self.columns >= 2 * SYMMETRIC_BLOCK
        scratch = torch.empty(min(SYMMETRIC_BLOCK, self.columns) * self.columns if banded else 0, dtype=dtype,
                              device=self.sum.device)                     # one scratch for all chunks
        for start in range(0, rows.shape[0], step):
            x = rows[start:start + step].to(device=self.sum.device, dtype=dtype)
            if banded:                       # the lower blocks only; the upper ones are mirrored when H is read
                add_lower_gram(self.sum, x, scratch, SYMMETRIC_BLOCK)
                self._mirrored = False
            elif dtype == self.sum.dtype:
                self.sum.addmm_(x.T, x)
            else:
                self.sum += x.T @ x
        self.count += rows.shape[0]

    def _settle(self) -> torch.Tensor:
        """The running sum with its upper blocks filled in from the lower ones (see :meth:`add_rows`)."""
        if not self._mirrored:
            mirror_lower(self.sum, SYMMETRIC_BLOCK)
            self._mirrored = True
        return self.sum

    def add_linear_input(self, inputs: torch.Tensor) -> None:
        """Fold in the input of a Linear layer, any leading shape ``[..., in]`` (all tokens count)."""
        self.add_rows(inputs.reshape(-1, inputs.shape[-1]))

    def add_conv2d_input(self, inputs: torch.Tensor, conv: torch.nn.Conv2d) -> None:
        """Fold in the input ``[B, C, H, W]`` of a (non-grouped) Conv2d via unfold: one sample per patch."""
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) have no single input Hessian; "
                             "keep them dense or prune them per group")
        padding = conv.padding
        if isinstance(padding, str):
            raise ValueError(f"Conv2d padding={padding!r} is not supported; use explicit padding")
        patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=padding,
                           stride=conv.stride)  # [B, C·kh·kw, L]
        self.add_rows(patches.transpose(1, 2).reshape(-1, patches.shape[1]))

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Fold another accumulator of the same layer into this one (exact)."""
        if other.columns != self.columns:
            raise ValueError(f"cannot merge Hessians of widths {self.columns} and {other.columns}")
        self._settle()
        self.sum += other._settle().to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count
        return self

    def hessian(self) -> torch.Tensor:
        """H = 2/N Σ x xᵀ."""
        if self.count == 0:
            raise ValueError("no calibration samples were accumulated for this layer")
        return self._settle() * (2.0 / self.count)

    def take_hessian(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """H = 2/N Σ x xᵀ, scaled in place in the running sum and handed over; the accumulator is empty after.

        For a caller that needs H once (a solve): ``hessian()`` would keep the running sum and a scaled copy
        alive together, two n×n float64 matrices where one suffices.  With ``dtype`` the handed-over matrix
        is converted, and the float64 sum is freed as soon as the caller drops its reference.
        """
        if self.count == 0:
            raise ValueError("no calibration samples were accumulated for this layer")
        if self.sum is None:
            raise ValueError("this accumulator's Hessian was already taken")
        h = self._settle().mul_(2.0 / self.count)
        self.sum = None                  # type: ignore[assignment]
        return h if dtype is None else h.to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self._settle(), "count": torch.tensor(self.count)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "HessianAccumulator":
        total = state["sum"]
        acc = cls(total.shape[0], float64=total.dtype == torch.float64, device=total.device)
        acc.sum.copy_(total)
        acc.count = int(state["count"])
        return acc


@dataclass
class FisherAccumulator:
    """Streaming block-diagonal empirical Fisher of one layer (CAP's curvature from gradients).

    The layer's weight, flattened row-major, is cut into ``numel / block_size`` blocks of
    ``block_size`` contiguous weights; each block keeps Σ g gᵀ over per-sample gradients.

    Args:
        numel: number of weights in the layer.
        block_size: B, weights per Fisher block; must divide ``numel``.
    """

    numel: int
    block_size: int
    float64: bool = False
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.numel % self.block_size:
            raise ValueError(f"Fisher block_size={self.block_size} must divide the layer's {self.numel} weights")
        blocks = self.numel // self.block_size
        self.sum = torch.zeros(blocks, self.block_size, self.block_size,
                               dtype=_accumulation_dtype(self.float64), device=self.device)
        self.count = 0

    def add_gradients(self, grads: torch.Tensor) -> None:
        """Fold in per-sample gradients ``[samples, *weight.shape]`` (or ``[samples, numel]``)."""
        g = grads.reshape(grads.shape[0], -1)
        if g.shape[1] != self.numel:
            raise ValueError(f"expected per-sample gradients with {self.numel} entries, got {g.shape[1]}")
        g = g.to(device=self.sum.device, dtype=self.sum.dtype).reshape(g.shape[0], -1, self.block_size)
        self.sum += torch.einsum("nbi,nbj->bij", g, g)  # [blocks, B, B]
        self.count += g.shape[0]

    def merge(self, other: "FisherAccumulator") -> "FisherAccumulator":
        if (other.numel, other.block_size) != (self.numel, self.block_size):
            raise ValueError("cannot merge Fisher accumulators of different layers or block sizes")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count
        return self

    def fisher(self) -> torch.Tensor:
        """The Fisher blocks ``[numel / B, B, B]``."""
        if self.count == 0:
            raise ValueError("no gradients were accumulated for this layer")
        return self.sum / self.count
