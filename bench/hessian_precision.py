"""Input Hessians with float32 products added into a float64 sum, against all-float64 (issue 12, item 8).

    python bench/hessian_precision.py                 # real layers + ViT-g-shaped timing (~2 min, 2 cores)

For every prunable layer of the real vit4mnist (512 MNIST test images) and EfficientNet-Lite0 (64 ImageNet
samples) it folds the same captured inputs into two accumulators, all-float64 (cap-dist before) and float32
products (:data:`cap_dist.solvers.curvature.FLOAT32_PRODUCT_ROWS` samples per product) into a float64 sum, and
reports the relative Frobenius error ‖H₃₂ − H₆₄‖/‖H₆₄‖ and the largest relative error of a diagonal entry. Then
it times both on ViT-g/14-shaped inputs (257 tokens per image, widths 1536 and 6144, random activations with a
few loud channels). Prints a table, writes bench/results/hessian_precision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.core import select_layers  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.models.capture import collect_hessians, layer_columns  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.solvers import HessianAccumulator  # noqa: E402

RECIPES = {"vit4mnist": ("jobs/vit4mnist.yaml", 512), "effnet_lite0": ("jobs/effnet_lite0.yaml", 64)}


def _errors(h64: torch.Tensor, h32: torch.Tensor) -> tuple[float, float]:
    frob = float(torch.linalg.matrix_norm(h32 - h64) / torch.linalg.matrix_norm(h64))
    d64 = h64.diagonal()
    diag = float(((h32.diagonal() - d64).abs() / d64.abs().clamp_min(1e-30)).max())
    return frob, diag


def real_layers(model_name: str) -> list[dict]:
    path, images = RECIPES[model_name]
    recipe = load_recipe(str(ROOT / path), [f"calibration.samples={images}"])
    model, spec = load_model(recipe.model.source)
    model.eval()
    layers = select_layers(model, recipe.model)
    batches = draw_batches(recipe.calibration, spec, purpose="calibration")

    def make(float32: bool) -> dict[str, HessianAccumulator]:
        return {n: HessianAccumulator(layer_columns(m), float64=True, float32_products=float32)
                for n, m in layers.items()}

    exact, mixed = make(False), make(True)
    for accs in (exact, mixed):
        collect_hessians(lambda: [model(x) for x, _ in batches], layers, accs=accs)
    rows = []
    for name in layers:
        frob, diag = _errors(exact[name].hessian(), mixed[name].hessian())
        rows.append(dict(model=model_name, layer=name, columns=exact[name].columns, samples=exact[name].count,
                         rel_frobenius=frob, max_rel_diagonal=diag))
    return rows


def timing(columns: int, images: int, repeats: int) -> dict:
    """Seconds to fold ``images`` ViT-g images (257 tokens each) of ``columns`` inputs, both ways."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images * 257, columns, generator=gen)
    x[:, :8] *= 20.0                                           # a few loud channels, as large ViTs have
    out = {}
    for label, float32 in (("float64", False), ("float32_products", True)):
        best = float("inf")
        for _ in range(repeats):
            acc = HessianAccumulator(columns, float64=True, float32_products=float32)
            start = time.perf_counter()
            acc.add_rows(x)
            best = min(best, time.perf_counter() - start)
        out[label] = best
        out[f"{label}_h"] = acc.hessian()
    frob, diag = _errors(out.pop("float64_h"), out.pop("float32_products_h"))
    return dict(columns=columns, tokens=images * 257, float64_s=out["float64"],
                float32_products_s=out["float32_products"], speedup=out["float64"] / out["float32_products"],
                rel_frobenius=frob, max_rel_diagonal=diag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--images", type=int, default=4, help="ViT-g images per timing run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/hessian_precision.json"))
    args = parser.parse_args()
    rows = [row for m in args.models for row in real_layers(m)]
    print(f"{'model':<13} {'layer':<28} {'cols':>5} {'samples':>8} {'rel ‖ΔH‖F':>10} {'max rel Δdiag':>13}")
    for r in rows:
        print(f"{r['model']:<13} {r['layer']:<28} {r['columns']:>5} {r['samples']:>8} {r['rel_frobenius']:>10.2e} "
              f"{r['max_rel_diagonal']:>13.2e}")
    worst = max(r["rel_frobenius"] for r in rows)
    print(f"worst relative Frobenius error over {len(rows)} real layers: {worst:.2e} (bound 1e-6)")
    times = [timing(c, args.images, args.repeats) for c in (1536, 6144)]
    print(f"\n{'cols':>5} {'tokens':>7} {'float64 s':>10} {'f32 prod s':>10} {'speedup':>8} {'rel ‖ΔH‖F':>10}")
    for t in times:
        print(f"{t['columns']:>5} {t['tokens']:>7} {t['float64_s']:>10.3f} {t['float32_products_s']:>10.3f} "
              f"{t['speedup']:>7.2f}× {t['rel_frobenius']:>10.2e}")
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                          "threads": torch.get_num_threads(), "layers": rows, "timing": times,
                                          "worst_rel_frobenius": worst}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
