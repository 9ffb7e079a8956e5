"""BatchNorm re-estimation after pruning, against statistics computed by hand with torch.nn.functional."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cap_dist.core.batchnorm import batchnorm_layers, measuring_batchnorm, reestimate_batchnorm
from cap_dist.core.stages import Stage


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, momentum=0.3))
    with torch.no_grad():                                   # stale "dense" statistics
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model.eval()


def reference_statistics(model: nn.Sequential, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each BatchNorm's running mean / unbiased variance as the equal-weight average over batches, with the layers
    after a BatchNorm seeing its batch-normalised output (train-mode BatchNorm) and no dropout."""
    conv1, bn1, _, _, conv2, bn2 = model
    stats: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for x in batches:
            a = conv1(x)
            stats[0].append(a.mean((0, 2, 3)))
            stats[1].append(a.var((0, 2, 3), unbiased=True))
            a = F.batch_norm(a, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)
            b = conv2(F.relu(a))
            stats[2].append(b.mean((0, 2, 3)))
            stats[3].append(b.var((0, 2, 3), unbiased=True))
    return [torch.stack(s).mean(0) for s in stats]


def test_reestimated_statistics_are_the_pruned_models_own() -> None:
    model = small_cnn()
    batches = [torch.randn(5, 3, 8, 8) * (1 + i) for i in range(3)]
    expected = reference_statistics(model, batches)
    count = reestimate_batchnorm(model, [Stage("all", model, {})], batches)
    assert count == 2
    got = [model[1].running_mean, model[1].running_var, model[5].running_mean, model[5].running_var]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert not model.training and not any(m.training for m in model.modules())     # back to eval
    assert model[1].momentum == 0.1 and model[5].momentum == 0.3                     # momentum restored


def test_measuring_restores_mode_even_on_error() -> None:
    model = small_cnn()
    try:
        with measuring_batchnorm(model):
            assert model[1].training and not model[3].training                       # dropout stays off
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not model[1].training and model[1].momentum == 0.1


def test_models_without_batchnorm_are_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert batchnorm_layers(model) == []
    assert reestimate_batchnorm(model, [Stage("all", model, {})], [torch.randn(3, 4)]) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layers_that_do_not_run_keep_their_statistics() -> None:
    """A Ray actor holds copies of modules another actor runs: only what runs is re-estimated (and reported)."""
    from cap_dist.core.batchnorm import measured_keys

    model = small_cnn()
    stale = model[5].running_mean.clone()
    with measuring_batchnorm(model) as ran, torch.no_grad():
        model[1](model[0](torch.randn(4, 3, 8, 8)))
    assert list(ran) == ["1"] and torch.equal(model[5].running_mean, stale)
    assert set(measured_keys(ran)) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
