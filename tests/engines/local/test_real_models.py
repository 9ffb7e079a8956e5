"""The local engine on the real trained ViT and real MNIST digits (needs ../shared; skips without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cap_dist.config import load_recipe
from cap_dist.data.draw import draw_batches
from cap_dist.eval import evaluate_model
from cap_dist.models.source import load_model
from cap_dist.engines import prune

ROOT = Path(__file__).resolve().parents[3]


def test_vit4mnist_cap_half_sparse_keeps_accuracy(shared_dir: Path, tmp_path: Path) -> None:
    recipe = load_recipe(str(ROOT / "jobs" / "vit4mnist.yaml"), [
        f"model.source={shared_dir / 'models' / 'vit4mnist'}", f"calibration.uri={shared_dir / 'data' / 'mnist'}",
        "calibration.samples=256", f"evaluation.uri={shared_dir / 'data' / 'mnist'}", "evaluation.subset=[512, 2512]",
        f"output={tmp_path / 'out'}", "engine=local"])
    report = prune(recipe)
    dense, spec = load_model(recipe.model.source)
    batches = draw_batches(recipe.evaluation, spec, purpose="evaluation")
    dense_top1 = evaluate_model(dense, batches)["top1"]
    metrics = evaluate_model(report.model, batches, dense_model=dense)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert metrics["top1"] >= dense_top1 - 0.01
    assert metrics["agreement"] >= 0.98
