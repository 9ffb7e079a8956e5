"""The local engine end to end on tiny real timm models and real image files written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cap_dist.config import RecipeError, load_recipe, recipe_from_dict
from cap_dist.output import CorruptOutputError, load_sparse, read_report
from cap_dist.engines import prune

VIT_KWARGS = {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 2.0}
INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(**VIT_KWARGS)
    (root / "vit").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "vit" / "model.safetensors")
    (root / "vit" / "model.json").write_text(json.dumps(
        {"architecture": "timm:VisionTransformer", "create_kwargs": VIT_KWARGS, "input": INPUT}))
    rng = np.random.default_rng(0)
    for label in range(4):
        folder = root / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = (rng.random((40, 40, 3)) * 60 + label * 60).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def recipe_tree(workdir: Path, **prune_cfg) -> dict:
    return {"model": {"source": str(workdir / "vit")},
            "calibration": {"uri": str(workdir / "images"), "samples": 32, "batch_size": 8},
            "prune": {"method": "cap", "sparsity": 0.5, "block_size": 16, **prune_cfg},
            "output": str(workdir / "out" / "-".join(f"{k}{v}" for k, v in prune_cfg.items())), "device": "cpu",
            "engine": "local"}


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_prune_writes_a_loadable_sparse_model(workdir: Path, mode: str) -> None:
    recipe = recipe_from_dict(recipe_tree(workdir, mode=mode))
    report = prune(recipe)
    assert len(report.layers) == 8                                  # qkv, proj, fc1, fc2 × 2 blocks
    assert all(r.sparsity == 0.5 for r in report.layers)
    model, manifest = load_sparse(recipe.output)
    assert manifest["recipe_hash"] == recipe.hash
    for name, tensor in report.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    assert float((model.blocks[1].mlp.fc2.weight == 0).float().mean()) == 0.5
    rows = read_report(recipe.output)
    assert [r["layer"] for r in rows] == [r.layer for r in report.layers]


def test_sequential_and_independent_differ_only_after_the_first_block(workdir: Path) -> None:
    seq = prune(recipe_from_dict(recipe_tree(workdir, mode="sequential")), write=False)
    ind = prune(recipe_from_dict(recipe_tree(workdir, mode="independent")), write=False)
    first = [n for n in seq.model.state_dict() if n.startswith("blocks.0.attn.qkv")]
    for name in first:                                             # block 0 sees the same dense inputs
        torch.testing.assert_close(seq.model.state_dict()[name], ind.model.state_dict()[name])
    assert not torch.equal(seq.model.blocks[1].mlp.fc2.weight, ind.model.blocks[1].mlp.fc2.weight)


def test_global_allocation_hits_the_target_with_different_layers(workdir: Path) -> None:
    report = prune(recipe_from_dict(recipe_tree(workdir, allocation="global", sparsity=0.6)), write=False)
    assert report.sparsity == pytest.approx(0.6, abs=2e-3)
    assert len({round(r.sparsity, 3) for r in report.layers}) > 1


def test_fisher_curvature_from_labels(workdir: Path) -> None:
    report = prune(recipe_from_dict(recipe_tree(workdir, curvature="fisher", fisher_block_size=16,
                                                mode="independent")), write=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)


def test_two_four_pattern(workdir: Path) -> None:
    report = prune(recipe_from_dict(recipe_tree(workdir, pattern="2:4", method="sparsegpt")), write=False)
    w = report.model.blocks[0].attn.qkv.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)


def test_bad_recipes_are_clear(workdir: Path, tmp_path: Path) -> None:
    tree = recipe_tree(workdir)
    tree["prune"]["sparsty"] = 0.5
    with pytest.raises(RecipeError, match="prune.sparsty: unknown key"):
        recipe_from_dict(tree)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe_tree(workdir)))
    with pytest.raises(RecipeError, match="prune.sparsity: Input should be less than 1"):
        load_recipe(str(path), ["prune.sparsity=1.5"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe(str(path), ["prune.sparsity"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_bad_inputs_fail_before_writing(workdir: Path) -> None:
    missing = recipe_tree(workdir)
    missing["model"]["source"] = str(workdir / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model does not exist"):
        prune(recipe_from_dict(missing))
    too_many = recipe_tree(workdir)
    too_many["calibration"]["samples"] = 500
    with pytest.raises(ValueError, match="samples=500 but .* has only 48 items"):
        prune(recipe_from_dict(too_many))
    nothing = recipe_tree(workdir)
    nothing["model"]["targets"] = ["blocks.*.no_such_layer"]
    with pytest.raises(ValueError, match="no_such_layer"):
        prune(recipe_from_dict(nothing))
    for tree in (missing, too_many, nothing):
        assert not Path(tree["output"], "sparsity.json").exists()


def test_corrupt_output_names_the_file(workdir: Path) -> None:
    recipe = recipe_from_dict(recipe_tree(workdir, damp=0.02))
    prune(recipe)
    weights = Path(recipe.output) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match="model.safetensors is corrupt"):
        load_sparse(recipe.output)
    (Path(recipe.output) / "sparsity.json").unlink()
    with pytest.raises(FileNotFoundError, match="sparsity.json is missing"):
        load_sparse(recipe.output)


def test_n_m_overrides_and_unquoted_yaml(workdir: Path, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe_tree(workdir)))
    assert str(load_recipe(str(path), ["prune.pattern=2:4"]).prune.pattern) == "2:4"
    tree = recipe_tree(workdir)
    tree["prune"]["pattern"] = 124
    with pytest.raises(RecipeError, match="quoted 'N:M'"):
        recipe_from_dict(tree)


def test_true_sequential_calibrates_later_layers_on_pruned_earlier_ones(workdir: Path) -> None:
    on = prune(recipe_from_dict(recipe_tree(workdir, true_sequential=True)), write=False).model
    off = prune(recipe_from_dict(recipe_tree(workdir, true_sequential=False)), write=False).model
    torch.testing.assert_close(on.blocks[0].attn.qkv.weight, off.blocks[0].attn.qkv.weight)
    assert not torch.equal(on.blocks[0].mlp.fc2.weight, off.blocks[0].mlp.fc2.weight)


def test_output_and_weights_through_an_fsspec_uri(workdir: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/models/vit/model.safetensors", (workdir / "vit" / "model.safetensors").read_bytes())
    fs.pipe("/models/vit/model.json", (workdir / "vit" / "model.json").read_bytes())
    tree = recipe_tree(workdir)
    tree["model"]["source"] = "memory://models/vit"
    tree["output"] = "memory://runs/vit-50"
    recipe = recipe_from_dict(tree)
    report = prune(recipe)
    model, manifest = load_sparse("memory://runs/vit-50")
    assert manifest["recipe_hash"] == recipe.hash
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, report.model.blocks[0].mlp.fc1.weight)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/runs/vit-50", detail=False)) == [
        "model.json", "model.safetensors", "report.parquet", "sparsity.json"]


@pytest.mark.parametrize("method", ["cap", "sparsegpt"])
def test_an_output_is_a_model_source_and_pruning_it_again_keeps_its_zeros(workdir: Path, method: str) -> None:
    """Gradual pruning's prune half: step 2 starts from step 1's output folder (its model.json) and only adds
    zeros; the OBS updates of step 2 never revive a weight step 1 removed."""
    from cap_dist.models.source import load_model

    first = recipe_from_dict(recipe_tree(workdir, method=method, sparsity=0.4))
    prune(first)
    dense_first, _ = load_model(first.output)                      # the output loads as a plain model folder
    step1, _ = load_sparse(first.output)
    for name, tensor in step1.state_dict().items():
        assert torch.equal(dense_first.state_dict()[name], tensor)
    tree = recipe_tree(workdir, method=method, sparsity=0.7)
    tree["model"] = {"source": first.output}
    tree["output"] = str(workdir / "out" / f"chained-{method}")
    second = prune(recipe_from_dict(tree))
    assert second.sparsity == pytest.approx(0.7, abs=1e-3)
    for name, module in step1.named_modules():
        if name in {r.layer for r in second.layers}:
            was_zero = module.weight == 0
            assert bool((second.model.get_submodule(name).weight[was_zero] == 0).all()), name


def test_file_uris_work_like_paths(workdir: Path) -> None:
    tree = recipe_tree(workdir)
    tree["model"]["source"] = f"file://{workdir / 'vit'}"
    tree["calibration"]["uri"] = f"file://{workdir / 'images'}"
    tree["output"] = f"file://{workdir / 'out' / 'file-uri'}"
    report = prune(recipe_from_dict(tree))
    model, manifest = load_sparse(str(workdir / "out" / "file-uri"))
    assert manifest["sparsity"] == pytest.approx(report.sparsity)
    assert not [p.name for p in (workdir / "out" / "file-uri").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("prune_cfg, message", [
    ({"pattern": "4:12"}, "pattern 4:12 needs every pruned layer's input width to be a multiple of 12"),
    ({"quantize": {"bits": 4, "group_size": 48}}, "quantize.group_size=48 needs every pruned layer's input width"),
])
def test_patterns_and_groups_no_layer_fits_fail_before_calibration(workdir: Path, prune_cfg: dict, message: str,
                                                                   monkeypatch) -> None:
    import cap_dist.data.draw as draw

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the recipe was checked against the layers")

    monkeypatch.setattr(draw, "draw_batches", no_calibration)
    with pytest.raises(ValueError, match=message):
        prune(recipe_from_dict(recipe_tree(workdir, **prune_cfg)))


def test_gptq_with_fisher_curvature_is_refused_by_the_recipe(workdir: Path) -> None:
    with pytest.raises(RecipeError, match="quantize.method=gptq needs activation curvature"):
        recipe_from_dict(recipe_tree(workdir, curvature="fisher", quantize={"bits": 8}))


def test_the_ray_driver_checks_the_layers_before_calibrating(workdir: Path, monkeypatch) -> None:
    """No Ray needed: the driver refuses the recipe before it calibrates or connects."""
    import cap_dist.data.draw as draw

    monkeypatch.setattr(draw, "draw_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    with pytest.raises(ValueError, match="pattern 4:12 needs"):
        prune(recipe_from_dict(dict(recipe_tree(workdir, pattern="4:12"), engine="ray")))


def test_batchnorm_statistics_are_reestimated_unless_kept(workdir: Path) -> None:
    """prune.batchnorm: reestimate writes the pruned model's own BatchNorm statistics, measured on the
    calibration images; keep writes the dense ones; the pruned weights are the same either way."""
    effnet = workdir / "effnet"
    if not effnet.exists():
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", num_classes=4)
        effnet.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, effnet / "model.safetensors")
        (effnet / "model.json").write_text(json.dumps(
            {"architecture": "timm:test_efficientnet", "create_kwargs": {"num_classes": 4}, "input": INPUT}))
    results = {}
    for choice in ("reestimate", "keep"):
        tree = recipe_tree(workdir, batchnorm=choice)
        tree["model"]["source"] = str(effnet)
        tree["output"] += "-effnet"
        results[choice] = prune(recipe_from_dict(tree))
    dense = {k: v for k, v in load_file(effnet / "model.safetensors").items()}
    new, kept = results["reestimate"].model.state_dict(), results["keep"].model.state_dict()
    stats = [k for k in dense if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    assert all(torch.equal(kept[k], dense[k]) for k in stats)
    assert all(not torch.equal(new[k], dense[k]) for k in stats)
    assert all(torch.equal(new[k], kept[k]) for k in new if k.endswith("weight") and k not in stats)
    assert "batchnorm" in results["reestimate"].timings and "batchnorm" not in results["keep"].timings
