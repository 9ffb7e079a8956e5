"""The Ray engine reproduces the local engine, survives a killed actor, resumes, and rejects
impossible plans — on one local Ray cluster shared by the test run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cap_dist.config import recipe_from_dict
from cap_dist.output import load_sparse
from cap_dist.engines import prune

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
MODELS = {
    "vit": ("timm:VisionTransformer", {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 32,
                                       "depth": 3, "num_heads": 2, "mlp_ratio": 2.0}),
    "convnext": ("timm:ConvNeXt", {"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32], "num_classes": 4}),
    "effnet": ("timm:test_efficientnet", {"num_classes": 4}),        # BatchNorm everywhere
    # wide enough that solving takes seconds: the kill below must land while work remains
    "vit_wide": ("timm:VisionTransformer", {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 256,
                                            "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("engine")
    for key, (arch, kwargs) in MODELS.items():
        torch.manual_seed(0)
        name = arch.removeprefix("timm:")
        model = timm.create_model(name, **kwargs) if name.startswith("test_") else getattr(timm.models, name)(**kwargs)
        (root / key).mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / key / "model.safetensors")
        (root / key / "model.json").write_text(json.dumps({"architecture": arch, "create_kwargs": kwargs,
                                                          "input": INPUT}))
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = root / "images" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((36, 36, 3)) * 200 + label * 40).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def tree(assets: Path, model: str, out: str, **prune_cfg) -> dict:
    # threads=1 for the local engine too, as each actor has (num_cpus=1): float32 products round differently with
    # another thread count, and near-tie mask choices of the polish follow the rounding.
    return {"model": {"source": str(assets / model)},
            "calibration": {"uri": str(assets / "images"), "samples": 16, "batch_size": 4},
            "prune": {"method": "cap", "sparsity": 0.5, "block_size": 16, **prune_cfg},
            "output": str(assets / "out" / out), "device": "cpu", "engine": "ray", "threads": 1}


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The local engine applies ``threads`` to this process; give the rest of the test run its own count back."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("model", ["convnext", "vit"])
@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_distributed_equals_single_process(ray_cluster, assets: Path, model: str, mode: str) -> None:
    local = prune(recipe_from_dict(dict(tree(assets, model, f"{model}-{mode}-local", mode=mode), engine="local")))
    expected = local.model.state_dict()
    for actors in (1, 2, 3):
        recipe = recipe_from_dict(dict(tree(assets, model, f"{model}-{mode}-{actors}", mode=mode),
                                       distributed={"actors": actors, "num_cpus": 1}))
        manifest = prune(recipe).manifest
        assert manifest["recipe_hash"] == local.recipe.hash
        # sharded: one file per actor, written by it, the index names each tensor's shard exactly once
        shards = [f"model-{i:05d}-of-{actors:05d}.safetensors" for i in range(1, actors + 1)]
        assert manifest["weights"] == "model.safetensors.index.json"
        assert sorted(n for n in manifest["files"] if n.startswith("model-")) == shards
        index = json.loads((Path(recipe.output) / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
        assert not (Path(recipe.output) / "model.safetensors").exists()
        stages = {"load", "calibrate", "solve", "output"} if mode == "independent" else {"load", "solve", "output"}
        assert all(stages <= set(a["stage_peak_rss_mb"]) for a in manifest["actors"])
        sparse, _ = load_sparse(recipe.output)
        for key, tensor in sparse.state_dict().items():
            assert torch.equal(tensor == 0, expected[key] == 0), (actors, key)
            torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)


def test_smaller_pipeline_steps_change_the_hessians_only_by_rounding(ray_cluster, assets: Path, capsys) -> None:
    """distributed.pipeline_images cuts the calibration stream into steps smaller than a batch: the chain idles
    less, and every layer's Hessian is the same sum over the same images, up to float32 rounding (its energy
    ½·tr(W H Wᵀ), which the dense weights and H alone decide, shows it); the masks agree but for near-ties."""
    local = prune(recipe_from_dict(dict(tree(assets, "vit", "vit-steps-local", mode="independent"), engine="local")))
    capsys.readouterr()
    recipe = recipe_from_dict(dict(tree(assets, "vit", "vit-steps-1", mode="independent"),
                                   distributed={"actors": 3, "num_cpus": 1, "pipeline_images": 1}))
    result = prune(recipe)
    assert "in 16 steps of at most 1 images; the chain idles 11% of the stream" in capsys.readouterr().out
    energy = {r.layer: r.loss / r.rel_error for r in local.layers}
    for record in result.layers:
        assert record.loss / record.rel_error == pytest.approx(energy[record.layer], rel=1e-5), record.layer
        assert record.sparsity == pytest.approx(0.5, abs=1e-9)
    expected = local.model.state_dict()
    sparse, _ = load_sparse(recipe.output)
    pruned = [k for k in expected if k.endswith(".weight") and bool((expected[k] == 0).any())]
    agree = sum(int(torch.eq(sparse.state_dict()[k] == 0, expected[k] == 0).sum()) for k in pruned)
    assert agree >= 0.98 * sum(expected[k].numel() for k in pruned)


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_batchnorm_reestimation_matches_single_process(ray_cluster, assets: Path, mode: str) -> None:
    """prune.batchnorm=reestimate: the actors' sharded pass over the calibration batches ends with the local
    engine's BatchNorm statistics (and these are not the dense model's)."""
    from cap_dist.models.source import ModelSource

    local = prune(recipe_from_dict(dict(tree(assets, "effnet", f"bn-{mode}-local", mode=mode, batchnorm="reestimate"),
                                        engine="local")))
    expected = local.model.state_dict()
    dense = ModelSource.of(local.recipe.model).load().state_dict()
    means = [k for k in expected if k.endswith("running_mean")]
    assert len(means) > 5 and all(not torch.equal(expected[k], dense[k]) for k in means)
    for actors in (1, 2):
        recipe = recipe_from_dict(dict(tree(assets, "effnet", f"bn-{mode}-{actors}", mode=mode,
                                            batchnorm="reestimate"), distributed={"actors": actors, "num_cpus": 1}))
        assert "batchnorm" in prune(recipe).manifest["timings"]
        sparse, _ = load_sparse(recipe.output)
        for key, tensor in sparse.state_dict().items():
            torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=f"{actors} actors: {key}")


def test_global_allocation_matches_single_process(ray_cluster, assets: Path) -> None:
    local = prune(recipe_from_dict(dict(tree(assets, "vit", "g-local", allocation="global", mode="independent",
                                             sparsity=0.6), engine="local")))
    recipe = recipe_from_dict(dict(tree(assets, "vit", "g-ray", allocation="global", mode="independent",
                                        sparsity=0.6), distributed={"actors": 2}))
    manifest = prune(recipe).manifest
    got = {r["layer"]: r["sparsity"] for r in manifest["layers"]}
    for r in local.layers:
        assert got[r.layer] == pytest.approx(r.sparsity, abs=1e-9)


def test_killed_actor_is_replaced_and_the_result_is_the_same(ray_cluster, assets: Path) -> None:
    import ray

    # The reference is an uninterrupted run with the same actors and threads (at this width, a different
    # thread count changes float rounding in the calibration matmuls, and with it near-tie greedy choices).
    reference = recipe_from_dict(dict(tree(assets, "vit_wide", "kill-reference", mode="independent", block_size=32),
                                      distributed={"actors": 2}))
    prune(reference).manifest
    expected, _ = load_sparse(reference.output)
    recipe = recipe_from_dict(dict(tree(assets, "vit_wide", "kill-ray", mode="independent", block_size=32),
                                   distributed={"actors": 2, "max_attempts": 3}))
    layers_dir = Path(recipe.output) / "layers"
    killed: list[str] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (layers_dir.exists() and any(layers_dir.iterdir())):
            time.sleep(0.02)
        prefix = f"cap-dist-{recipe.hash[:10]}-"
        for name in ray.util.list_named_actors():
            if name.startswith(prefix) and name.endswith("-0-1"):        # attempt 0, actor 1
                ray.kill(ray.get_actor(name), no_restart=True)
                killed.append(name)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    prune(recipe).manifest
    thread.join(timeout=60)
    assert killed, "the actor was never killed: the test did not exercise a failure"
    written = len(list(layers_dir.glob("*.safetensors")))
    assert written == 16                                                  # every layer, once
    # (an actor killed while writing may leave its temporary file: never a layer file, never read back)
    assert all(p.name.endswith(".tmp") for p in layers_dir.iterdir() if p.suffix != ".safetensors")
    sparse, _ = load_sparse(recipe.output)
    for key, tensor in sparse.state_dict().items():
        assert torch.equal(tensor, expected.state_dict()[key]), key


def test_rerun_resumes_without_solving_again(ray_cluster, assets: Path) -> None:
    recipe = recipe_from_dict(dict(tree(assets, "vit", "resume", mode="independent"), distributed={"actors": 2}))
    first = prune(recipe).manifest
    files = {p.name: p.stat().st_mtime_ns for p in (Path(recipe.output) / "layers").iterdir()}
    second = prune(recipe).manifest
    assert {p.name: p.stat().st_mtime_ns for p in (Path(recipe.output) / "layers").iterdir()} == files
    assert [r["loss"] for r in second["layers"]] == [r["loss"] for r in first["layers"]]


@pytest.mark.parametrize("distributed,message", [
    ({"actors": 0}, "need at least 1 actor"),
    ({"actors": 4}, "only 3 blocks"),
    ({"actors": 2, "num_cpus": 3}, "the Ray cluster has 4"),
    ({"actors": 1, "num_gpus": 1}, "GPU = 1 GPU, but the Ray cluster has 0"),
])
def test_impossible_plans_fail_fast(ray_cluster, assets: Path, distributed: dict, message: str) -> None:
    recipe = recipe_from_dict(dict(tree(assets, "vit", "bad"), distributed=distributed))
    with pytest.raises(ValueError, match=message):
        prune(recipe).manifest


def test_cli_prune_runs_on_ray_and_writes_plan(ray_cluster, assets: Path, tmp_path: Path, capsys) -> None:
    from cap_dist.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(dict(tree(assets, "vit", "cli"), distributed={"actors": 2})))
    assert main(["prune", "--config", str(recipe)]) == 0
    out = Path(tree(assets, "vit", "cli")["output"])
    plan = json.loads((out / "plan.json").read_text())
    assert [p["stages"][0] for p in plan] == ["prefix", "blocks.2"] or len(plan) == 2
    manifest = json.loads((out / "sparsity.json").read_text())
    assert manifest["engine"] == "ray" and len(manifest["actors"]) == 2
    for actor in manifest["actors"]:                   # where each actor's memory went, by stage
        assert {"load", "solve", "output"} <= set(actor["stage_peak_rss_mb"])      # (sequential: no calibrate)
        assert actor["peak_rss_mb"] >= max(actor["stage_peak_rss_mb"].values()) - 1
    assert "ray engine" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [{"pattern": "2:4"}, {"pattern": "2:4", "quantize": {"bits": 4}}])
def test_n_m_and_quantization_on_ray_equal_single_process(ray_cluster, assets: Path, extra: dict) -> None:
    """N:M (and N:M + GPTQ int4) through the distributed engine: the same masks and weights as one process, and
    every pruned layer keeps exactly 2 of every 4 consecutive inputs."""
    from cap_dist.solvers.patterns import is_valid_n_m, parse_pattern

    name = "nm-q" if "quantize" in extra else "nm"
    local = prune(recipe_from_dict(dict(tree(assets, "vit", f"{name}-local", **extra), engine="local")))
    recipe = recipe_from_dict(dict(tree(assets, "vit", f"{name}-ray", **extra), distributed={"actors": 2}))
    manifest = prune(recipe).manifest
    sparse, _ = load_sparse(recipe.output)
    expected = local.model.state_dict()
    for key, tensor in sparse.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)
    for row in manifest["layers"]:
        weight = sparse.get_submodule(row["layer"]).weight
        assert is_valid_n_m(weight.reshape(weight.shape[0], -1) != 0, parse_pattern("2:4")) or "quantize" in extra
        assert float((weight == 0).float().mean()) >= 0.5 - 1e-9
