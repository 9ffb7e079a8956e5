"""Structured pruning composed with the Ray engine: the structured model (a folder with reduced shapes) is the Ray
engine's model source, and its 2:4 prune equals the local engine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cap_dist.config import recipe_from_dict
from cap_dist.engines import prune
from cap_dist.output import load_sparse
from tests.engines.distributed.test_engine import _torch_threads_restored, assets, tree  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_structured_then_2_4_on_ray_equals_single_process(ray_cluster, assets: Path) -> None:  # noqa: F811
    extra = {"structured": {"target": 0.7, "multiple_of": 4}}
    local = recipe_from_dict({**tree(assets, "vit", "structured-local", pattern="2:4"), **extra, "engine": "local"})
    ray = recipe_from_dict({**tree(assets, "vit", "structured-ray", pattern="2:4"), **extra,
                            "distributed": {"actors": 2}})
    prune(local)
    assert prune(ray).engine == "ray"
    expected, _ = load_sparse(local.output)
    got, manifest = load_sparse(ray.output)
    assert manifest["engine"] == "ray" and manifest["recipe"]["model"]["source"].endswith("structured-ray/structured")
    assert got.blocks[0].mlp.fc2.in_features < 64
    for key, tensor in got.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[key], rtol=1e-5, atol=1e-6)
