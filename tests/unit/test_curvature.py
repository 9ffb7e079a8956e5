"""Streaming curvature accumulators against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cap_dist.solvers import FisherAccumulator, HessianAccumulator


def test_linear_hessian_over_all_tokens_and_exact_merge() -> None:
    x = torch.randn(4, 7, 10, dtype=torch.float64)              # [batch, tokens, in]
    whole = HessianAccumulator(10, float64=True)
    whole.add_linear_input(x)
    a, b = HessianAccumulator(10, float64=True), HessianAccumulator(10, float64=True)
    a.add_linear_input(x[:1])
    b.add_linear_input(x[1:])
    flat = x.reshape(-1, 10)
    expected = 2.0 / flat.shape[0] * flat.T @ flat
    torch.testing.assert_close(whole.hessian(), expected)
    torch.testing.assert_close(a.merge(b).hessian(), expected)
    restored = HessianAccumulator.from_state_dict(whole.state_dict())
    torch.testing.assert_close(restored.hessian(), expected)


def test_conv_hessian_via_unfold_reproduces_the_conv_output_error() -> None:
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    acc = HessianAccumulator(3 * 9, float64=True)
    acc.add_conv2d_input(x, conv)
    delta = torch.randn(5, 27, dtype=torch.float64)
    # ½ δ H δᵀ must equal the mean squared output change per spatial position
    out = F.conv2d(x, delta.reshape(5, 3, 3, 3), stride=2, padding=1)
    positions = out.shape[0] * out.shape[2] * out.shape[3]
    direct = float(out.pow(2).sum()) / positions
    assert 0.5 * float(((delta @ acc.hessian()) * delta).sum()) == pytest.approx(direct, rel=1e-10)


def test_grouped_conv_and_wrong_widths_are_rejected() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="grouped"):
        acc.add_conv2d_input(torch.randn(1, 4, 5, 5), torch.nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="expected samples"):
        acc.add_linear_input(torch.randn(3, 5))
    with pytest.raises(ValueError, match="no calibration samples"):
        acc.hessian()
    with pytest.raises(ValueError, match="merge"):
        acc.merge(HessianAccumulator(5))


def test_block_fisher_from_per_sample_gradients() -> None:
    grads = torch.randn(20, 3, 4, dtype=torch.float64)
    acc = FisherAccumulator(numel=12, block_size=6, float64=True)
    acc.add_gradients(grads)
    fisher = acc.fisher()
    assert fisher.shape == (2, 6, 6)
    flat = grads.reshape(20, 2, 6)
    for b in range(2):
        torch.testing.assert_close(fisher[b], flat[:, b].T @ flat[:, b] / 20)
    with pytest.raises(ValueError, match="must divide"):
        FisherAccumulator(numel=12, block_size=5)
