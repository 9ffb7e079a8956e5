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


def test_rows_folded_in_slices_give_the_same_hessian(monkeypatch) -> None:
    from cap_dist.solvers import curvature

    monkeypatch.setattr(curvature, "_CHUNK_BYTES", 3 * 6 * 8)     # three float64 rows of six per slice
    monkeypatch.setattr(curvature, "_MIN_CHUNK_ROWS", 1)
    x = torch.randn(20, 6)
    acc = HessianAccumulator(6, float64=True)
    acc.add_rows(x)
    flat = x.double()
    torch.testing.assert_close(acc.hessian(), 2.0 / 20 * flat.T @ flat)
    assert acc.count == 20


def test_take_hessian_hands_over_the_scaled_sum_once() -> None:
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    acc = HessianAccumulator(6, float64=True)
    acc.add_linear_input(x)
    expected = acc.hessian()
    running = acc.sum
    taken = acc.take_hessian()
    assert taken.data_ptr() == running.data_ptr()            # scaled in place: no second n×n float64 matrix
    torch.testing.assert_close(taken, expected)
    with pytest.raises(ValueError, match="already taken"):
        acc.take_hessian()
    again = HessianAccumulator(6, float64=True)
    again.add_linear_input(x)
    as32 = again.take_hessian(torch.float32)
    assert as32.dtype == torch.float32
    torch.testing.assert_close(as32, expected.float())
    with pytest.raises(ValueError, match="no calibration samples"):
        HessianAccumulator(6).take_hessian()


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


def test_float32_products_stay_within_1e6_of_float64_on_loud_correlated_inputs() -> None:
    """float32 chunk products added into a float64 sum: the same H as all-float64 to 1e-6 relative (Frobenius),
    on inputs with a few channels 20× louder than the rest and correlated columns (as large ViTs have), across
    several chunks of FLOAT32_PRODUCT_ROWS."""
    from cap_dist.solvers.curvature import FLOAT32_PRODUCT_ROWS

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3 * FLOAT32_PRODUCT_ROWS + 77, 96, generator=gen)
    x = z @ (torch.randn(96, 96, generator=gen) / 96 ** 0.5)
    x[:, :4] *= 20.0
    exact = HessianAccumulator(96, float64=True)
    mixed = HessianAccumulator(96, float64=True, float32_products=True)
    for part in x.split(500):                        # batches that straddle the product chunks
        exact.add_rows(part)
        mixed.add_rows(part)
    h64, h32 = exact.hessian(), mixed.hessian()
    assert mixed.count == exact.count == x.shape[0]
    rel = float(torch.linalg.matrix_norm(h32 - h64) / torch.linalg.matrix_norm(h64))
    assert 0 < rel < 1e-6
    assert torch.equal(h32, h32.T)                   # X Xᵀ from one GEMM stays exactly symmetric


def test_float32_products_reach_the_accumulators_from_the_recipe() -> None:
    """prune.hessian_products picks the products (float32 by default), and the capture path passes it on."""
    from cap_dist.config import PruneConfig
    from cap_dist.models.capture import collect_hessians

    assert PruneConfig().hessian_products == "float32"
    layer = torch.nn.Linear(8, 4)
    accs = collect_hessians(lambda: layer(torch.randn(5, 8)), {"l": layer}, float32_products=True)
    assert accs["l"].float32_products and accs["l"].sum.dtype == torch.float64
    assert not collect_hessians(lambda: layer(torch.randn(5, 8)), {"l": layer})["l"].float32_products


@pytest.mark.parametrize("float32_products", [False, True])
def test_banded_products_equal_the_whole_product_and_merge_before_mirroring(monkeypatch,
                                                                           float32_products: bool) -> None:
    """Wide layers form only the lower blocks of XᵀX and mirror them when H is read: H must equal the
    whole product (and be exactly symmetric) through merge, state_dict and take_hessian, including widths
    that are not a multiple of the block."""
    from cap_dist.solvers import curvature

    monkeypatch.setattr(curvature, "SYMMETRIC_BLOCK", 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 21, generator=g, dtype=torch.float64) * torch.linspace(0.5, 8.0, 21, dtype=torch.float64)
    expected = 2.0 / 50 * x.T @ x
    tol = dict(rtol=1e-6, atol=1e-6) if float32_products else dict(rtol=1e-12, atol=1e-12)
    a = HessianAccumulator(21, float64=True, float32_products=float32_products)
    b = HessianAccumulator(21, float64=True, float32_products=float32_products)
    a.add_rows(x[:30])
    b.add_rows(x[30:])
    assert not torch.equal(a.sum, a.sum.T), "the banded path was not taken"
    merged = a.merge(b)
    h = merged.hessian()
    torch.testing.assert_close(h, expected, **tol)
    assert torch.equal(h, h.T)
    state = merged.state_dict()["sum"]
    assert torch.equal(state, state.T)
    torch.testing.assert_close(merged.take_hessian(), expected, **tol)


def test_row_quadratic_forms_read_the_lower_triangle_in_blocks() -> None:
    from cap_dist.solvers.numerics import add_lower_gram, mirror_lower, row_quadratic_forms

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 23, generator=g, dtype=torch.float64)
    h = x.T @ x
    a = torch.randn(5, 23, generator=g, dtype=torch.float64)
    torch.testing.assert_close(row_quadratic_forms(a, h, block=4), ((a @ h) * a).sum(1), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(row_quadratic_forms(a, h, block=64), ((a @ h) * a).sum(1), rtol=1e-12, atol=1e-10)
    total = torch.zeros(23, 23, dtype=torch.float64)
    add_lower_gram(total, x, torch.empty(4 * 23, dtype=torch.float64), block=4)
    assert torch.equal(torch.triu(total, 4), torch.zeros_like(total))      # above the diagonal blocks: untouched
    mirror_lower(total, block=4)
    torch.testing.assert_close(total, h, rtol=1e-12, atol=1e-10)
    assert torch.equal(total, total.T)
    from cap_dist.solvers.products import use_onednn

    x32 = torch.randn(300, 70, generator=g)                               # float32 products into a float64 sum,
    for route in (True, False):                                           # through oneDNN or torch's product
        with use_onednn(route):
            total = torch.zeros(70, 70, dtype=torch.float64)
            add_lower_gram(total, x32, torch.empty(16 * 70), block=16)
        assert torch.equal(torch.triu(total, 16), torch.zeros_like(total))
        mirror_lower(total, block=16)
        want = x32.double().T @ x32.double()
        assert float((total - want).norm() / want.norm()) < 1e-6
