"""Every GPU recipe in jobs/ schedules on a simulated cluster of the shape it is sized for: a head without CPUs and
a worker node with the CPUs, (fake) GPUs and memory of the cluster/aws.yaml worker type that holds its actors
(``ray.cluster_utils.Cluster`` in a child process, tiny models of the recipes' architectures, CPU compute). A
recipe whose actors cannot be placed (a bundle missing a resource the actor asks for, too much per node) fails
here, not on the user's cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.simulated import JOBS, node_for, worker_types

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]
GPU_RECIPES = sorted(p.name for p in JOBS.glob("*.yaml") if "num_gpus" in p.read_text())


def test_every_gpu_recipe_has_a_worker_type_that_holds_its_actors() -> None:
    from cap_dist.config import load_recipe

    shapes = worker_types()
    assert GPU_RECIPES and {"gpu_4x_l4", "gpu_8x_a100"} <= set(shapes)
    for name in GPU_RECIPES:
        assert node_for(load_recipe(str(JOBS / name)), shapes) in shapes


def test_every_gpu_recipe_schedules_and_prunes_on_its_cluster_shape(tmp_path: Path) -> None:
    result = tmp_path / "schedule.json"
    run = subprocess.run([sys.executable, "-m", "tests.cluster.simulated", str(result), *GPU_RECIPES], cwd=ROOT,
                         capture_output=True, text=True, timeout=1400)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads(result.read_text())}
    assert sorted(rows) == GPU_RECIPES
    failed = {name: row["error"] for name, row in rows.items() if not row["ok"]}
    assert not failed, failed
    for name, row in rows.items():                               # every planned actor was placed and ran
        assert row["actors"] == yaml.safe_load((JOBS / name).read_text())["distributed"]["actors"], name
