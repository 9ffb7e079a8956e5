"""Shared fixtures for the math tests: correlated synthetic layer inputs."""

from __future__ import annotations

import torch


def correlated_problem(rows: int, cols: int, samples: int, seed: int, rho: float = 0.7,
                       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [rows, cols], inputs X [samples, cols] with AR(1) correlation ρ and log-normal feature
    scales (a few loud inputs, as in real transformer activations), and H = 2/N XᵀX."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(cols)
    cov = rho ** (idx[:, None] - idx[None, :]).abs().double()
    scales = torch.exp(0.5 * torch.randn(cols, generator=g, dtype=torch.float64))
    x = (torch.randn(samples, cols, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T) * scales
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    h = 2.0 / samples * x.T @ x
    return w.to(dtype), x.to(dtype), h.to(dtype)
