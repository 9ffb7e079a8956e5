"""One actor of the Ray engine lost in sequential mode and during BatchNorm re-estimation (killed on the test run's
shared Ray): only it is replaced, nothing written is solved again, and the output equals an undisturbed run's.
(Lost nodes on a multi-node cluster: tests/cluster/test_node_loss.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from cap_dist.config import recipe_from_dict
from cap_dist.engines import prune
from cap_dist.output import load_sparse
from tests.engines.distributed.test_engine import assets, tree  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _kill(recipe, index: int) -> str:
    import ray

    name = f"-0-{index}"
    for actor in ray.util.list_named_actors():
        if actor.startswith(f"cap-dist-{recipe.hash[:10]}-") and actor.endswith(name):
            ray.kill(ray.get_actor(actor), no_restart=True)
            return actor
    raise AssertionError(f"no actor {name} of the run")


def _equal_outputs(a: str, b: str) -> None:
    first, _ = load_sparse(a)
    second, _ = load_sparse(b)
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), key


def test_actor_lost_in_sequential_mode_is_replaced_alone(ray_cluster, assets: Path) -> None:  # noqa: F811
    spec = dict(tree(assets, "vit_wide", "seq-reference", mode="sequential", block_size=32),
                distributed={"actors": 2})
    reference = prune(recipe_from_dict(spec))
    recipe = recipe_from_dict(dict(spec, output=str(assets / "out" / "seq-lost")))
    layers = Path(recipe.output) / "layers"
    seen: dict[str, int] = {}

    def killer() -> None:               # actor 1 solves after actor 0: kill it once it has written a layer
        deadline = time.time() + 300
        while time.time() < deadline:
            written = {p.stem: p.stat().st_mtime_ns for p in layers.glob("blocks.[23].*.safetensors")}
            if written:
                seen.update({p.stem: p.stat().st_mtime_ns for p in layers.glob("*.safetensors")})
                _kill(recipe, 1)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    manifest = prune(recipe).manifest
    thread.join(timeout=30)
    assert seen, "actor 1 was never killed"
    assert manifest["actor_starts"] == 3 and [r["lost"] for r in manifest["recoveries"]] == [[1]]
    after = {p.stem: p.stat().st_mtime_ns for p in layers.glob("*.safetensors")}
    assert {k: after[k] for k in seen} == seen                           # written before the loss: not again
    _equal_outputs(reference.output, recipe.output)


def test_actor_lost_while_reestimating_batchnorm_measures_each_batch_once(ray_cluster, assets: Path,  # noqa: F811
                                                                          monkeypatch) -> None:
    import ray

    from cap_dist.engines.distributed import driver

    spec = dict(tree(assets, "effnet", "bn-reference", mode="independent", batchnorm="reestimate"),
                distributed={"actors": 2})
    reference = prune(recipe_from_dict(spec))
    recipe = recipe_from_dict(dict(spec, output=str(assets / "out" / "bn-lost")))
    original = driver._wait_all
    killed: list[str] = []

    def wait_all(refs, desc=None, unit="call"):
        if desc == "BatchNorm batches" and not killed:
            ray.wait(refs, num_returns=2)                                # 2 of 4 batches measured by both
            killed.append(_kill(recipe, 0))
        return original(refs, desc, unit)

    monkeypatch.setattr(driver, "_wait_all", wait_all)
    layers = Path(recipe.output) / "layers"
    manifest = prune(recipe).manifest
    assert killed
    assert manifest["actor_starts"] == 3
    assert [(r["phase"], r["lost"]) for r in manifest["recoveries"]] == [("re-estimating BatchNorm", [0])]
    assert len(list(layers.glob("*.safetensors"))) == len(manifest["layers"])
    _equal_outputs(reference.output, recipe.output)
