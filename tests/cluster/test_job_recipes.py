"""jobs/: every recipe validates, every timm model in one is a family cap-dist can split and plan on the recipe's
actor count (built on the meta device: no weights, no downloads), the sizing fits the cluster node types, and
jobs/submit.sh builds the exact `ray job submit` command."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from cap_dist.config import Recipe, load_recipe
from cap_dist.finetune.schedule import schedule_sparsities

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
RECIPES = sorted(p.name for p in JOBS.glob("*.yaml"))
SUBMIT = JOBS / "submit.sh"

# The flagship recipes of the cluster workflow and the model family each must resolve to.
FLAGSHIPS = {
    "dinov2_vitg14_oneshot50.yaml": "dinov2",
    "dinov2_vitg14_gradual75.yaml": "dinov2",
    "dinov2_vitl14_oneshot50.yaml": "dinov2",
    "deit_small_gradual90.yaml": "vit",
    "deit_base_gradual75.yaml": "vit",
    "convnext_base_oneshot50.yaml": "convnext",
    "vit_base_r50_oneshot50.yaml": "vit_hybrid",
}


def recipe(name: str) -> Recipe:
    return load_recipe(str(JOBS / name))


def timm_recipes() -> list[str]:
    return [n for n in RECIPES if yaml.safe_load((JOBS / n).read_text())["model"]["source"].startswith("timm:")]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads(name: str) -> None:
    r = recipe(name)
    assert r.output and r.calibration.uri


def test_flagship_recipes_exist() -> None:
    assert set(FLAGSHIPS) <= set(RECIPES)
    assert set(FLAGSHIPS) <= set(timm_recipes())


@pytest.mark.parametrize("name", timm_recipes())
def test_timm_model_splits_and_plans_on_the_recipes_actors(name: str) -> None:
    """The driver's own planning path (meta-device skeleton -> stage costs -> contiguous actor ranges)."""
    from cap_dist.core import select_layers
    from cap_dist.engines.distributed.driver import stage_costs
    from cap_dist.engines.distributed.plan import plan_actors
    from cap_dist.models.families import group_layers, split_blocks
    from cap_dist.models.source import ModelSource

    r = recipe(name)
    model = ModelSource.of(r.model).meta_skeleton()
    assert all(p.device.type == "meta" for p in model.parameters())
    blocks = split_blocks(model)
    if name in FLAGSHIPS:
        assert blocks.family == FLAGSHIPS[name]
    layers = select_layers(model, r.model)
    per_block = group_layers(layers, blocks)                    # every prunable layer lies in exactly one block
    assert sum(len(g) for g in per_block) == len(layers) > 0

    costs, n_blocks = stage_costs(r, model)
    assert n_blocks == len(blocks)
    plans = plan_actors(costs, r.distributed.actors, n_blocks)
    assert len(plans) == r.distributed.actors
    assert [s for p in plans for s in p.stages] == [c.name for c in costs]
    assert all(any(s not in ("prefix", "suffix") for s in p.stages) for p in plans)


def test_vitg_sizing_comment_matches_the_model() -> None:
    """The ViT-g recipe's comments quote 160 layers and 7.6 GB of float64 Hessians; hold them to the model."""
    from cap_dist.engines.distributed.driver import stage_costs
    from cap_dist.models.source import ModelSource

    r = recipe("dinov2_vitg14_oneshot50.yaml")
    costs, n_blocks = stage_costs(r, ModelSource.of(r.model).meta_skeleton())
    assert n_blocks == 40
    hessians = sum(c.hessian_bytes for c in costs)
    assert abs(hessians / 1e9 - 7.63) < 0.05
    text = (JOBS / "dinov2_vitg14_oneshot50.yaml").read_text()
    assert "160 prunable layers" in text and "7.6 GB" in text


@pytest.mark.parametrize("name", [n for n in FLAGSHIPS if "finetune" in yaml.safe_load((JOBS / n).read_text())])
def test_gradual_recipes_have_a_valid_schedule_on_gpus(name: str) -> None:
    r = recipe(name)
    steps = schedule_sparsities(r.schedule, r.prune.sparsity)
    assert len(steps) == r.schedule.steps >= 2
    assert steps == sorted(steps) and steps[-1] == r.prune.sparsity
    assert r.finetune.use_gpu and r.finetune.gpus_per_worker >= 1
    assert r.finetune.storage_path and r.finetune.storage_path.startswith("s3://")


@pytest.mark.parametrize("name", sorted(FLAGSHIPS))
def test_flagship_is_sized_for_a_gpu_node_type(name: str) -> None:
    """With PACK, all actors of a prune fit one node of some worker type of each cluster launcher config."""
    r = recipe(name)
    cfg = r.distributed
    assert r.engine == "ray" and cfg.num_gpus >= 1 and cfg.placement == "PACK" and cfg.memory_gb
    assert 1024 <= (r.calibration.samples or 0) <= 4096
    assert r.prune.method == "cap" and r.prune.block_size == 128
    for launcher in ("aws.yaml", "gcp.yaml"):
        config = yaml.safe_load((ROOT / "cluster" / launcher).read_text())
        fits = []
        for type_name, spec in config["available_node_types"].items():
            res = spec["resources"]
            ok = (res.get("GPU", 0) >= cfg.actors * cfg.num_gpus and res.get("CPU", 0) >= cfg.actors * cfg.num_cpus
                  and ("memory" not in res or res["memory"] >= cfg.actors * cfg.memory_gb * 2**30))
            if ok:
                fits.append(type_name)
        assert fits, f"{name}: {cfg.actors} actors x ({cfg.num_gpus} GPU, {cfg.num_cpus} CPU, {cfg.memory_gb} GiB) " \
                     f"fit no node type of {launcher}"
        if r.finetune is not None:
            capacity = sum(s["max_workers"] * s["resources"].get("GPU", 0)
                           for k, s in config["available_node_types"].items() if k != config["head_node_type"])
            assert r.finetune.workers * r.finetune.gpus_per_worker <= capacity


@pytest.mark.parametrize("name", sorted(FLAGSHIPS))
def test_cloud_recipes_use_placeholder_buckets(name: str) -> None:
    r = recipe(name)
    uris = [r.model.weights, r.calibration.uri, r.output] + ([r.evaluation.uri] if r.evaluation else [])
    if r.finetune is not None:
        uris += [r.finetune.data.uri, r.finetune.storage_path]
    for uri in uris:
        assert uri and uri.startswith("s3://YOUR-BUCKET/"), uri


# ---------------------------------------------------------------------------------------------------------
# jobs/submit.sh


def submit(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DRY_RUN")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=30)


def expected(*entrypoint: str, address: str = "http://127.0.0.1:8265", extra: tuple[str, ...] = ()) -> list[str]:
    return ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
            "cluster/runtime_env.yaml", *extra, "--", "cap-dist", *entrypoint]


def test_submit_dry_run_prints_the_exact_command() -> None:
    out = submit("--dry-run", "jobs/dinov2_vitg14_oneshot50.yaml")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == expected("prune", "--config", "jobs/dinov2_vitg14_oneshot50.yaml")


def test_submit_picks_run_for_gradual_recipes_and_passes_overrides() -> None:
    out = submit("jobs/deit_small_gradual90.yaml", "finetune.epochs=2", "output=s3://b/runs/x y",
                 env={"DRY_RUN": "1", "RAY_ADDRESS": "http://head:8265"})
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == expected("run", "--config", "jobs/deit_small_gradual90.yaml",
                                               "finetune.epochs=2", "output=s3://b/runs/x y",
                                               address="http://head:8265")


def test_submit_explicit_command_options_and_another_cwd(tmp_path: Path) -> None:
    out = submit("--dry-run", "--no-wait", "--address", "http://10.0.0.1:8265", "--submission-id", "vitg-1",
                 str(JOBS / "dinov2_vitg14_gradual75.yaml"), "prune", "prune.sparsity=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == expected(
        "prune", "--config", "jobs/dinov2_vitg14_gradual75.yaml", "prune.sparsity=0.5",
        address="http://10.0.0.1:8265", extra=("--no-wait", "--submission-id", "vitg-1"))
    assert str(ROOT) in out.stderr                                # says where --working-dir . is taken


@pytest.mark.parametrize("args,message", [
    (("jobs/no_such_recipe.yaml",), "does not exist"),
    (("jobs/vit4mnist.yaml", "finetune"), "unknown command"),
    (("jobs/vit4mnist.yaml", "prune", "sparsity"), "not key=value"),
    (("--bogus", "jobs/vit4mnist.yaml"), "unknown option"),
    ((), "usage:"),
])
def test_submit_errors_are_clear(args: tuple[str, ...], message: str) -> None:
    out = submit(*args, env={"DRY_RUN": "1"})
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stdout == ""


def test_submit_refuses_a_recipe_outside_the_repository(tmp_path: Path) -> None:
    outside = tmp_path / "r.yaml"
    outside.write_text((JOBS / "vit4mnist.yaml").read_text())
    out = submit("--dry-run", str(outside))
    assert out.returncode == 2 and "outside the repository" in out.stderr


def test_submit_is_executable_and_strict() -> None:
    assert os.access(SUBMIT, os.X_OK)
    head = SUBMIT.read_text().splitlines()
    assert head[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in head
