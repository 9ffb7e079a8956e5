"""What a prune refuses before any work, the same on both engines: a bad weights file (missing, not safetensors,
pickled, truncated, another model's) and a bad output target (a file, not writable, another recipe's finished
output); what it reuses (this recipe's finished output); and that identical runs write identical bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cap_dist.cli import main
from cap_dist.config import recipe_from_dict
from cap_dist.engines import prune
from cap_dist.output import OutputTargetError

from tests.engines.local.test_pipeline import recipe_tree, workdir  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[3]


def _bad_folder(workdir: Path, tmp_path: Path, kind: str) -> Path:  # noqa: F811
    folder = tmp_path / f"vit-{kind}"
    shutil.copytree(workdir / "vit", folder)
    weights = folder / "model.safetensors"
    if kind == "missing":
        weights.unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif kind == "pickled":
        from safetensors.torch import load_file

        state = load_file(weights)
        weights.unlink()
        torch.save(state, weights)
    elif kind == "swapped":
        spec = json.loads((folder / "model.json").read_text())
        spec["create_kwargs"]["embed_dim"] = 48                   # another model than the weights hold
        (folder / "model.json").write_text(json.dumps(spec))
    elif kind == "text":
        weights.write_text("not a model")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "model.safetensors"),
    ("truncated", "is truncated: its header describes"),
    ("pickled", "is a pickled checkpoint (torch.save), not safetensors; cap-dist never unpickles"),
    ("swapped", "do not match the model"),
    ("text", "is not a valid safetensors file"),
])
def test_bad_weights_fail_once_with_the_same_line_on_both_engines(workdir: Path, tmp_path: Path, capsys,  # noqa: F811
                                                                  kind: str, message: str) -> None:
    tree = recipe_tree(workdir)
    tree["model"]["source"] = str(_bad_folder(workdir, tmp_path, kind))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tree))
    lines = {}
    for engine in ("local", "ray"):                 # the Ray engine refuses before it starts or joins any Ray
        assert main(["prune", "--config", str(recipe), f"engine={engine}", f"output={tmp_path / engine}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        lines[engine] = err[0]
        assert not (tmp_path / engine / "sparsity.json").exists()
    assert lines["local"] == lines["ray"]


def test_an_output_path_that_is_a_file_or_unwritable_is_refused_before_calibration(
        workdir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    import cap_dist.data.draw as draw

    monkeypatch.setattr(draw, "draw_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated")))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for output, message in ((a_file, "is a file; give a folder"), (a_file / "below", "cannot write to output=")):
        tree = dict(recipe_tree(workdir), output=str(output))
        with pytest.raises(OutputTargetError, match=message):
            prune(recipe_from_dict(tree))


def test_another_recipes_output_is_refused_unless_overwrite_and_the_same_recipe_is_reused(
        workdir: Path, tmp_path: Path, caplog) -> None:  # noqa: F811
    out = str(tmp_path / "shared-out")
    first = prune(recipe_from_dict(dict(recipe_tree(workdir), output=out)))
    with caplog.at_level("INFO", logger="cap_dist.engines"):
        again = prune(recipe_from_dict(dict(recipe_tree(workdir), output=out)))
    assert "already holds this recipe's finished output" in caplog.text and "reusing it" in caplog.text
    assert again.manifest["written_at"] == first.manifest["written_at"] and again.model is None
    assert [r.loss for r in again.layers] == [r.loss for r in first.layers]
    other = dict(recipe_tree(workdir, sparsity=0.75), output=out)
    with pytest.raises(OutputTargetError, match="already holds a finished output of another recipe"):
        prune(recipe_from_dict(other))
    replaced = prune(recipe_from_dict(dict(other, overwrite=True)))
    assert replaced.sparsity == pytest.approx(0.75)
    assert json.loads((Path(out) / "sparsity.json").read_text())["recipe_hash"] == replaced.recipe.hash


def test_identical_runs_in_separate_processes_write_identical_files(workdir: Path, tmp_path: Path) -> None:  # noqa: F811
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(recipe_tree(workdir)))
    env = dict(os.environ, PYTHONHASHSEED="random")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "cap_dist", "prune", "--config", str(recipe), "engine=local",
                        f"output={tmp_path / name}"], check=True, cwd=ROOT, env=env, capture_output=True)
    for file in ("model.safetensors", "model.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_the_weights_writer_is_byte_stable_across_processes(tmp_path: Path) -> None:
    """safetensors writes header metadata in a per-process hash order: with more than one metadata key, identical
    runs would differ in bytes (and checksums) about half the time. Five processes must agree."""
    script = ("import sys, torch; from cap_dist.shards import write_safetensors; print(write_safetensors("
              "sys.argv[1], {'b.weight': torch.arange(6.).reshape(2, 3), 'a': torch.ones(2)}).sha256)")
    digests = {subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")], check=True,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="random"),
                              cwd=ROOT).stdout.strip() for i in range(5)}
    assert len(digests) == 1, digests
