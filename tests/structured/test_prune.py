"""Structured pruning of tiny real timm models end to end (in memory): the target is reached, the model is
physically smaller and still runs, and CAP's greedy loses less than the baselines at the same compute."""

from __future__ import annotations

import pytest
import timm
import torch

from cap_dist.config import StructuredConfig
from cap_dist.models.structures import find_structures
from cap_dist.structured.costs import module_macs
from cap_dist.structured.prune import prune_structured


def _vit_and_data() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3, 32, 32, generator=g)
    inputs = [base + 0.5 * torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]   # correlated images
    return model, inputs


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_target_is_reached_and_the_model_is_smaller(allocation: str) -> None:
    model, inputs = _vit_and_data()
    dense_macs = sum(module_macs(model, inputs[0][:1]).values())
    cfg = StructuredConfig(target=0.6, allocation=allocation)
    records = prune_structured(model, inputs, cfg)
    macs = sum(module_macs(model, inputs[0][:1]).values())
    assert macs <= 0.6 * dense_macs * 1.0001
    assert macs >= 0.5 * dense_macs                       # not far past the target
    assert {r.kind for r in records} == {"mlp", "heads"}
    assert [s.groups for s in find_structures(model)] == [r.kept for r in records]
    assert all(0 <= r.rel_error < 1 for r in records)
    with torch.no_grad():
        assert torch.isfinite(model(inputs[0])).all()


def test_cap_loses_no_more_than_the_baselines_at_equal_compute() -> None:
    errors = {}
    for method in ("cap", "obs", "magnitude"):
        model, inputs = _vit_and_data()
        dense = model(inputs[1]).detach()
        prune_structured(model, inputs, StructuredConfig(target=0.75, method=method, allocation="uniform",
                                                         structures=["mlp"]))
        errors[method] = float((model(inputs[1]).detach() - dense).pow(2).mean())
    assert errors["cap"] <= errors["obs"] * 1.05
    assert errors["cap"] < errors["magnitude"]
