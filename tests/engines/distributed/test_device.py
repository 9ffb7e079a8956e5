"""The solvers follow their tensors' device: on CUDA they run there (torch kernels), with the CPU result."""

from __future__ import annotations

import pytest
import torch

from cap_dist.solvers import prune_layer

from tests.solvers.synthetic import correlated_problem

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
    from cap_dist.solvers.cap import greedy_kernels

    with pytest.raises(ValueError, match="runs on the CPU; use backend='torch'"):
        greedy_kernels("numba", torch.device("cuda", 0))
    assert greedy_kernels("auto", torch.device("cuda", 0))[2] == "torch"
    assert greedy_kernels("auto", torch.device("cpu"))[2] == "numba"


def _half_materialised() -> torch.nn.Module:
    """A shard as PruneActor holds it: its own block real, another shard's block still on the meta device."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].to("meta")
    model[0].weight.requires_grad_(False)
    return model


def test_shard_move_keeps_meta_placeholders_and_moves_the_rest() -> None:
    """PruneActor's move to its reserved device, exercised on the meta device (the one non-CPU device every
    machine has): real tensors move, flags are kept, meta placeholders are left alone instead of failing."""
    from cap_dist.engines.distributed.actor import _materialised_to

    model = _half_materialised()
    _materialised_to(model, torch.device("meta"))
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model[0].weight.requires_grad is False and model[0].bias.requires_grad is True
    cpu_model = _half_materialised()
    before = {k: v.clone() for k, v in cpu_model.state_dict().items() if not v.is_meta}
    _materialised_to(cpu_model, torch.device("cpu"))                          # CPU: nothing to do
    assert all(torch.equal(cpu_model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.gpu
@needs_cuda
def test_shard_moves_to_cuda() -> None:
    from cap_dist.engines.distributed.actor import _materialised_to

    model = _half_materialised()
    _materialised_to(model, torch.device("cuda"))
    assert model[0].weight.device.type == "cuda" and model[1].running_mean.device.type == "cuda"
    assert model[2].weight.is_meta
