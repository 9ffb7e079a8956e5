"""Model sources, unlabelled Parquet calibration with Fisher curvature, bad images, and the CLI end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cap_dist.cli import main
from cap_dist.config import recipe_from_dict
from cap_dist.data.parquet import write_image_parquet
from cap_dist.models.source import load_model
from cap_dist.models.spec import ModelLoadError
from cap_dist.engines import prune

from tests.engines.local.test_pipeline import INPUT, VIT_KWARGS, recipe_tree, workdir  # noqa: F401  (fixture)


def _png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((36, 36, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_timm_architecture_with_a_weights_file(tmp_path: Path) -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded, spec = load_model("timm:vit_tiny_patch16_224", str(tmp_path / "w.safetensors"),
                              {"img_size": 32, "num_classes": 3})
    torch.testing.assert_close(loaded.head.weight, model.head.weight)
    assert spec["size"] == 32 and len(spec["mean"]) == 3
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model("timm:vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), {"img_size": 32})
    with pytest.raises(ModelLoadError, match="give model.weights"):
        load_model("timm:vit_tiny_patch16_224", None, {"img_size": 32})       # offline: no hub weights
    with pytest.raises(ModelLoadError, match="timm has no model"):
        load_model("timm:no_such_net")


def test_fisher_on_unlabelled_parquet_draws_labels_from_the_model(workdir: Path, tmp_path: Path) -> None:  # noqa: F811
    uri = str(tmp_path / "calib.parquet")
    write_image_parquet(uri, [_png(i) for i in range(16)])
    tree = recipe_tree(workdir, curvature="fisher", fisher_block_size=16, mode="sequential")
    tree["calibration"] = {"uri": uri, "samples": 16, "batch_size": 8}
    report = prune(recipe_from_dict(tree), write=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)


def test_bad_images_stop_or_are_skipped_with_a_count(workdir: Path, tmp_path: Path) -> None:  # noqa: F811
    uri = str(tmp_path / "calib.parquet")
    write_image_parquet(uri, [_png(i) for i in range(6)] + [b"this is not an image"] + [_png(9)], [0] * 8)
    tree = recipe_tree(workdir)
    tree["calibration"] = {"uri": uri, "batch_size": 4}
    with pytest.raises(ValueError, match="on_bad_image=skip"):
        prune(recipe_from_dict(tree), write=False)
    tree["calibration"]["on_bad_image"] = "skip"
    with pytest.warns(RuntimeWarning, match="skipped 1 image"):
        prune(recipe_from_dict(tree), write=False)


def test_cli_prune_then_eval(workdir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    tree = recipe_tree(workdir)
    tree["evaluation"] = {"uri": str(workdir / "images"), "batch_size": 16}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tree))
    out = tmp_path / "run"
    assert main(["prune", "--config", str(recipe), f"output={out}", "prune.sparsity=0.75"]) == 0
    assert (out / "sparsity.json").exists() and (out / "report.parquet").exists()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["n"] == 48
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["prune", "--config", str(recipe), "prune.sparsity=2"]) == 2
    assert "prune.sparsity" in capsys.readouterr().err


def test_cli_eval_as_encoder_reports_cosine_and_knn(workdir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    tree = recipe_tree(workdir)
    tree["evaluation"] = {"uri": str(workdir / "images"), "batch_size": 16}
    tree["output"] = str(tmp_path / "enc")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tree))
    assert main(["prune", "--config", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "enc"), "--kind", "encoder"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 < metrics["cosine"] <= 1.0
    assert 0.0 <= metrics["knn_top1"] <= 1.0 and 0.0 <= metrics["dense_knn_top1"] <= 1.0
