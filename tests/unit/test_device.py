"""The solvers follow their tensors' device: on CUDA they run there (torch kernels), with the CPU result."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers import prune_layer

from tests.unit.synthetic import correlated_problem

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["cap", "sparsegpt", "obs", "wanda", "magnitude"])
def test_cuda_matches_cpu(method: str) -> None:
    w, _, h = correlated_problem(rows=32, cols=128, samples=512, seed=0)
    cpu = prune_layer(w, h, method=method, sparsity=0.6, block_size=32)
    gpu = prune_layer(w.cuda(), h.cuda(), method=method, sparsity=0.6, block_size=32)
    assert gpu.weight.device.type == "cuda" and gpu.mask.device.type == "cuda"
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-6, atol=1e-9)


def test_numba_backend_refuses_non_cpu_tensors() -> None:
    from cap_dist.solvers.cap import _kernels

    with pytest.raises(ValueError, match="runs on the CPU; use backend='torch'"):
        _kernels("numba", torch.device("cuda", 0))
    assert _kernels("auto", torch.device("cuda", 0))[2] == "torch"
    assert _kernels("auto", torch.device("cpu"))[2] == "numba"
