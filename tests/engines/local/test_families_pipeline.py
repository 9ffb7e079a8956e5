"""Every model family through the local engine: sequential and independent, every default layer pruned exactly."""

from __future__ import annotations

import pytest
import torch

from cap_dist.config import recipe_from_dict
from cap_dist.core import select_layers
from cap_dist.engines.local import prune_model

from tests.models.test_families import CASES


@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_prunes_end_to_end(case: str, mode: str) -> None:
    builder, _, size = CASES[case]
    torch.manual_seed(0)
    model = builder().eval()
    batches = [(torch.randn(4, 3, size, size), None) for _ in range(2)]
    with torch.no_grad():
        dense_out = model(batches[0][0])
    recipe = recipe_from_dict({"model": {"source": "-"}, "calibration": {"uri": "-"}, "output": "-",
                               "prune": {"method": "cap", "sparsity": 0.5, "mode": mode, "block_size": 32}})
    layers = select_layers(model, recipe.model)
    records, _ = prune_model(recipe, model, batches, layers)
    assert sorted(r.layer for r in records) == sorted(layers)
    assert all(abs(r.sparsity - 0.5) < 1e-9 for r in records)
    for name, module in layers.items():
        assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), name
    with torch.no_grad():
        out = model(batches[0][0])
    assert torch.isfinite(out).all() and out.shape == dense_out.shape
