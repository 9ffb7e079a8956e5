"""A recipe with a structured section end to end on the local engine: the output is a physically smaller model
that load_sparse rebuilds with plain timm modules, that serves as a model source, and that composes with N:M and
int8 on what remains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cap_dist.config import recipe_from_dict
from cap_dist.engines import prune
from cap_dist.models.source import ModelSource
from cap_dist.output import load_sparse
from tests.engines.local.test_pipeline import workdir  # noqa: F401  (the fixture: a tiny ViT folder and images)

def _recipe(workdir: Path, name: str, **prune_cfg):
    return recipe_from_dict({
        "model": {"source": str(workdir / "vit")},
        "calibration": {"uri": str(workdir / "images"), "samples": 32, "batch_size": 16},
        "structured": {"target": 0.6, "multiple_of": 4},
        "prune": {"method": "cap", "block_size": 16, "mode": "independent", **prune_cfg},
        "output": str(workdir / "out-structured" / name), "device": "cpu", "engine": "local"})


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_structured_output_is_a_smaller_model_that_load_sparse_rebuilds(workdir: Path, capsys) -> None:
    recipe = _recipe(workdir, "only", sparsity=0.0)
    result = prune(recipe)
    model, manifest = load_sparse(recipe.output)
    shapes = json.loads((Path(recipe.output) / "model.json").read_text())["structured"]
    assert shapes and {v["kind"] for v in shapes.values()} <= {"mlp", "heads"}
    assert [r["kept"] for r in manifest["structured"]] == [
        shapes.get(r["name"], {"groups": r["groups"]})["groups"] for r in manifest["structured"]]
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in ModelSource.of(recipe.model).skeleton().parameters())
    assert type(model.blocks[0].mlp).__module__.startswith("timm.")    # plain timm modules, smaller tensors
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), result.model.eval()(_images()))
    again = ModelSource.parse(recipe.output).load()                     # the output is a model source
    with torch.no_grad():
        torch.testing.assert_close(again(_images()), model(_images()))
    from cap_dist.cli import main

    assert main(["eval", recipe.output, "--data", str(workdir / "images")]) == 0
    assert '"plot_skipped"' in capsys.readouterr().out


def test_structured_then_2_4_and_int8_on_what_remains(workdir: Path) -> None:
    recipe = _recipe(workdir, "nm-int8", pattern="2:4", quantize={"bits": 8, "method": "gptq"})
    result = prune(recipe)
    assert Path(recipe.output, "structured", "sparsity.json").exists()
    model, manifest = load_sparse(recipe.output)
    assert manifest["recipe"]["model"]["source"].endswith("/structured")
    structured, _ = load_sparse(str(Path(recipe.output, "structured")))
    assert model.blocks[0].mlp.fc2.in_features == structured.blocks[0].mlp.fc2.in_features
    fc2 = model.blocks[0].mlp.fc2.weight
    assert float((fc2 == 0).float().mean()) == pytest.approx(0.5)
    assert all(r.sparsity == pytest.approx(0.5) for r in result.layers)
    with torch.no_grad():
        assert torch.isfinite(model(_images())).all()
    assert prune(recipe).manifest["recipe_hash"] == manifest["recipe_hash"]      # a rerun reuses both steps


def test_gradual_removes_structures_in_its_first_step_only(workdir: Path) -> None:
    from cap_dist.config import ModelConfig
    from cap_dist.finetune.gradual import _prune_recipe, step_recipes

    tree = _recipe(workdir, "gradual", sparsity=0.0).model_dump(mode="json")
    tree["finetune"] = {"data": {"uri": str(workdir / "images")}}
    recipe = recipe_from_dict(tree)
    assert [s for s, _, _ in step_recipes(recipe)] == [0.0]             # structured alone: one step
    with pytest.raises(ValueError, match="schedule.steps=1"):
        step_recipes(recipe_from_dict({**tree, "schedule": {"steps": 3}}))
    later = ModelConfig(source=str(workdir / "vit"))
    assert _prune_recipe(recipe, later, 0.5, "x", first=True).structured == recipe.structured
    assert _prune_recipe(recipe, later, 0.5, "x", first=False).structured is None


def test_whole_branches_removed_rebuild_and_compose_with_2_4(workdir: Path) -> None:
    """structured.branches: a target beyond what half of every module allows removes whole attention / MLP
    branches; the output records them (groups 0), rebuilds, and the 2:4 step prunes what remains."""
    from cap_dist.models.structures import ConstantBranch

    recipe = _recipe(workdir, "branches", pattern="2:4")
    recipe = recipe.model_copy(update={"structured": recipe.structured.model_copy(
        update={"target": 0.45, "max_fraction": 0.5, "branches": True})})
    prune(recipe)
    structured, manifest = load_sparse(str(Path(recipe.output, "structured")))
    whole = [r["name"] for r in manifest["structured"] if r["kept"] == 0]
    assert whole
    shapes = json.loads((Path(recipe.output, "structured", "model.json")).read_text())["structured"]
    assert all(shapes[n]["groups"] == 0 for n in whole)
    assert all(isinstance(structured.get_submodule(n), ConstantBranch) for n in whole)
    model, _ = load_sparse(recipe.output)
    assert all(isinstance(model.get_submodule(n), ConstantBranch) for n in whole)
    remaining = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    assert remaining and len(whole) < len(manifest["structured"])
    assert all(float((m.weight == 0).float().mean()) == pytest.approx(0.5) for m in remaining)
    with torch.no_grad():
        assert torch.isfinite(model(_images())).all()
