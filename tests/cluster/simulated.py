"""Run every GPU recipe of jobs/ on a simulated cluster of the shape it is sized for (run as a script, in its own
process: it starts its own multi-node Ray, which must not meet the test run's shared cluster).

    python -m tests.cluster.simulated RESULT.json [RECIPE.yaml ...]

Each recipe keeps its ``distributed`` section (actors, CPUs, GPUs, memory, PACK); its model is swapped for a tiny
one of the same timm architecture (random weights written here), its data for a few images written here, and
its compute is the CPU. The cluster is a head that advertises no CPUs (as in cluster/aws.yaml) and one worker
node of the smallest aws.yaml worker type that holds all the recipe's actors, with that type's CPUs, (fake)
GPUs and memory. A recipe passes when its prune finishes with every actor placed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.conftest import LOCAL_ONLY

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"

# The tiny stand-in of each recipe's architecture: the same timm builder, small widths, enough blocks for 8
# actors where a recipe has 8.
TINY: dict[str, dict] = {
    "vit_giant_patch14_dinov2": {"img_size": 28, "embed_dim": 32, "depth": 8, "num_heads": 2},
    "vit_large_patch14_dinov2": {"img_size": 28, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "deit_base_patch16_224": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "deit_small_patch16_224": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "convnext_base": {"depths": [1, 1, 2, 1], "dims": [8, 16, 16, 32]},
    "vit_base_r50_s16_384": {"img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2},
}
RAY_MEMORY_FRACTION = 0.7      # Ray advertises about 70 % of a node's RAM as its `memory` resource


def worker_types() -> dict[str, dict[str, float]]:
    """cluster/aws.yaml's worker types: CPUs and GPUs from ``resources``, memory from the instance's GiB."""
    import yaml

    text = (ROOT / "cluster" / "aws.yaml").read_text()
    types = yaml.safe_load(text)["available_node_types"]
    shapes = {}
    for name, spec in types.items():
        resources = spec.get("resources", {})
        if not resources.get("CPU"):
            continue                                               # the head: no actor runs there
        instance = spec["node_config"]["InstanceType"]
        gib = re.search(rf"InstanceType:\s*{re.escape(instance)}\s*#.*?(\d+) GiB", text)
        if gib is None:
            raise ValueError(f"cluster/aws.yaml: say the RAM of {instance} (worker type {name}) as '# ... N GiB'")
        shapes[name] = {"CPU": float(resources["CPU"]), "GPU": float(resources.get("GPU", 0)),
                        "memory": float(gib.group(1)) * 2**30 * RAY_MEMORY_FRACTION}
    return shapes


def node_for(recipe, shapes: dict[str, dict[str, float]]) -> str:
    cfg = recipe.distributed
    need = {"CPU": cfg.actors * cfg.num_cpus, "GPU": cfg.actors * cfg.num_gpus,
            "memory": cfg.actors * (cfg.memory_gb or 0) * 2**30}
    fits = [n for n, s in shapes.items() if all(s[k] >= v for k, v in need.items())]
    if not fits:
        raise ValueError(f"no worker type of cluster/aws.yaml holds {cfg.actors} actors of {need}")
    return min(fits, key=lambda n: (shapes[n]["GPU"], shapes[n]["CPU"]))


def tiny_assets(recipe, work: Path) -> list[str]:
    """Overrides that swap the recipe's model and data for tiny local ones of the same architecture."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    name = recipe.model.source.removeprefix("timm:").split(".")[0]
    kwargs = TINY[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    weights = work / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    images = work / "images"
    if not images.exists():
        rng = np.random.default_rng(0)
        for label in range(2):
            (images / f"c{label}").mkdir(parents=True)
            for i in range(4):
                pixels = (rng.random((72, 72, 3)) * 200 + label * 40).astype(np.uint8)
                Image.fromarray(pixels).save(images / f"c{label}" / f"{i}.png")
    return [f"model.source=timm:{name}", f"model.weights={weights}", f"model.create_kwargs={json.dumps(kwargs)}",
            f"calibration.uri={images}", "calibration.samples=4", "calibration.batch_size=2",
            "schedule.steps=1", "schedule.first=null", "device=cpu", "distributed.schedule_timeout_s=120",
            f"output={work / 'out' / name}"]


def keep_cluster_address_private() -> None:
    """A ``ray.cluster_utils.Cluster`` head writes its address to /tmp/ray/ray_current_cluster, and any
    ``ray.init()`` without an address on this machine (another test's own local Ray, a ``cap-dist prune`` of a
    user) then joins this simulated cluster while it lives. Our drivers pass the address explicitly, so the head
    need not publish it."""
    import ray._private.utils

    ray._private.utils.write_ray_address = lambda *args, **kwargs: None


def run(recipes: list[str], result: Path) -> None:
    home = Path(tempfile.mkdtemp())
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ.update(LOCAL_ONLY, HOME=str(home))                 # before Ray is imported
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    from cap_dist.config import load_recipe
    from cap_dist.engines import prune

    keep_cluster_address_private()
    shapes = worker_types()
    rows = []
    by_node: dict[str, list[str]] = {}
    for name in recipes:
        by_node.setdefault(node_for(load_recipe(str(JOBS / name)), shapes), []).append(name)
    for node, names in by_node.items():
        shape = shapes[node]
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "temp_dir": tempfile.mkdtemp(prefix="rs", dir="/tmp")})
        cluster.add_node(num_cpus=shape["CPU"], num_gpus=shape["GPU"], memory=int(shape["memory"]),
                         node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        try:
            for name in names:
                start = time.perf_counter()
                row = {"recipe": name, "node": node, "node_shape": shape}
                try:
                    with tempfile.TemporaryDirectory() as work:
                        recipe = load_recipe(str(JOBS / name), tiny_assets(load_recipe(str(JOBS / name)),
                                                                           Path(work)))
                        out = prune(recipe)
                        row.update(ok=True, actors=len(out.manifest["actors"]), layers=len(out.layers),
                                   sparsity=out.sparsity)
                except Exception as err:  # noqa: BLE001 - every recipe is tried; the test reads the reason
                    row.update(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    result.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    chosen = sys.argv[2:] or sorted(p.name for p in JOBS.glob("*.yaml")
                                    if "distributed:" in p.read_text() and "num_gpus" in p.read_text())
    run(chosen, Path(sys.argv[1]))
