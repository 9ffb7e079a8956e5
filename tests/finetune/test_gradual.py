"""`cap-dist run`: CAP's gradual schedule with two pruning steps (the Ray engine) and a Ray Train finetune after
each; the final model is at the final sparsity and every zero of the first step is still zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cap_dist.cli import main
from cap_dist.config import recipe_from_dict
from cap_dist.finetune.gradual import MaskViolationError, check_masks_kept, step_recipes
from cap_dist.output import load_sparse
from tests.finetune.test_ray_finetune import _tree, assets  # noqa: F401  (module fixture reused)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def _gradual_tree(root: Path, name: str) -> dict:
    tree = _tree(root, name, epochs=1)
    tree["prune"] = {"method": "cap", "sparsity": 0.7, "block_size": 16}
    tree["schedule"] = {"start": 0.0, "first": 0.4, "steps": 2}
    tree["engine"] = "ray"
    tree["distributed"] = {"actors": 2}
    return tree


def test_gradual_run_keeps_earlier_masks_and_reaches_the_final_sparsity(ray_cluster, assets: Path,  # noqa: F811
                                                                        capsys) -> None:
    config = assets / "gradual.yaml"
    config.write_text(yaml.safe_dump(_gradual_tree(assets, "gradual")))
    assert main(["run", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "step 1: 40.00% sparsity" in printed and "step 2: 70.00% sparsity" in printed

    steps = step_recipes(recipe_from_dict(_gradual_tree(assets, "gradual")))
    assert [s for s, _, _ in steps] == [0.4, 0.7]
    (_, pruned1, tuned1), (_, pruned2, tuned2) = steps
    first, first_manifest = load_sparse(tuned1)
    final, manifest = load_sparse(tuned2)
    assert manifest["sparsity"] == pytest.approx(0.7, abs=2e-3)
    assert first_manifest["sparsity"] == pytest.approx(0.4, abs=2e-3)
    layers = [row["layer"] for row in manifest["layers"]]
    assert len(layers) == 8
    for name in layers:
        before = first.get_submodule(name).weight
        after = final.get_submodule(name).weight
        assert torch.equal(after[before == 0], torch.zeros_like(after[before == 0])), name
        assert float((after == 0).float().mean()) == pytest.approx(0.7, abs=0.01), name
    assert check_masks_kept(tuned1, tuned2, layers) > 0

    # A rerun finds every step finished and does no work.
    assert main(["run", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("(reused)") == 4


def test_mask_violations_are_caught(assets: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    from safetensors.torch import load_file

    from cap_dist.shards import write_safetensors

    weights = load_file(str(assets / "pruned" / "model.safetensors"))
    name = "blocks.0.mlp.fc1.weight"
    revived = weights[name].clone()
    revived[weights[name] == 0] = 1e-3
    shutil.copytree(assets / "pruned", tmp_path / "bad")          # an output whose weights were changed in place
    write_safetensors(str(tmp_path / "bad" / "model.safetensors"), {**weights, name: revived})
    with pytest.raises(MaskViolationError, match=f"weights of {name} that are zero"):
        check_masks_kept(str(assets / "pruned"), str(tmp_path / "bad"), ["blocks.0.mlp.fc1"])


def test_run_and_prune_refuse_the_wrong_recipe(assets: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    tree = _gradual_tree(assets, "x")
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["prune", "--config", str(config)]) == 2
    assert "cap-dist run" in capsys.readouterr().err
    del tree["finetune"]
    config.write_text(yaml.safe_dump(tree))
    assert main(["run", "--config", str(config)]) == 2
    assert "needs a finetune section" in capsys.readouterr().err


def test_n_m_one_shot_plus_finetune_keeps_the_pattern(ray_cluster, assets: Path) -> None:  # noqa: F811
    """`schedule.steps: 1` with a 2:4 pattern: prune once, finetune; the finetuned model still keeps exactly 2 of
    every 4 consecutive inputs in every pruned layer (the finetune masks are the pruning masks)."""
    from cap_dist.finetune.gradual import run_gradual
    from cap_dist.solvers.patterns import is_valid_n_m, parse_pattern

    tree = _tree(assets, "nm-run", epochs=1)
    tree["prune"] = {"method": "cap", "pattern": "2:4", "block_size": 16}
    summary = run_gradual(recipe_from_dict(tree))
    assert len(summary["steps"]) == 1
    model, manifest = load_sparse(summary["final"])
    for row in manifest["layers"]:
        weight = model.get_submodule(row["layer"]).weight
        assert is_valid_n_m(weight.reshape(weight.shape[0], -1) != 0, parse_pattern("2:4")), row["layer"]
    tree["schedule"] = {"steps": 2}
    with pytest.raises(ValueError, match="fixes the sparsity; use schedule.steps=1"):
        run_gradual(recipe_from_dict(tree))
