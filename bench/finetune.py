"""Recovery after pruning, measured: CAP one-shot (and gradual) + sparse finetuning with distillation on Ray Train
(2 CPU workers, FSDP2 over gloo), top-1 against the dense model on held-out images.

    python bench/finetune.py                                   # every case (~35 min on 2 cores)
    python bench/finetune.py --cases vit4mnist-75 --epochs 4

vit4mnist: calibrate on and finetune on MNIST test images 0..7,999 (the real ViT was trained on MNIST's training
set, which is not here), evaluate on 8,000..9,999. tf_efficientnet_lite0: calibrate and finetune on 600 of the
1,000 ImageNet samples, evaluate on the other 400. Each case runs `cap-dist run` (cap_dist.finetune.gradual):
prune with the single-process engine, finetune on Ray Train, check on disk that every pruned weight stayed zero.
Writes bench/results/finetune.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scaling import start_local_ray  # noqa: E402
from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.eval import evaluate_model  # noqa: E402
from cap_dist.finetune.gradual import run_gradual  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.output import load_sparse  # noqa: E402

MNIST = str(ROOT.parent / "shared" / "data" / "mnist")
IMAGENET = str(ROOT.parent / "shared" / "data" / "imagenet-samples")


def vit4mnist(sparsity: float, steps: int, epochs: int) -> list[str]:
    return ["calibration.subset=[0, 8000]", "calibration.samples=512", "evaluation.subset=[8000, 10000]",
            f"prune.sparsity={sparsity}", f"schedule.steps={steps}", "schedule.first=0.5" if steps > 1 else
            "schedule.first=null", f"finetune.data.uri={MNIST}", "finetune.data.subset=[0, 8000]",
            "finetune.data.batch_size=64", "finetune.data.augment=none", f"finetune.epochs={epochs}",
            "finetune.lr=1e-3", "finetune.min_lr=1e-5", "finetune.warmup_steps=20", "finetune.weight_decay=0.01",
            "finetune.distill.weight=1.0", "finetune.distill.temperature=2.0", "finetune.workers=2",
            "finetune.evaluation_every=0"]


def effnet(sparsity: float, steps: int, epochs: int) -> list[str]:
    return ["calibration.subset=[0, 600]", "calibration.samples=256", "evaluation.subset=[600, 1000]",
            f"prune.sparsity={sparsity}", f"schedule.steps={steps}", f"finetune.data.uri={IMAGENET}",
            "finetune.data.subset=[0, 600]", "finetune.data.batch_size=16", "finetune.data.augment=light",
            f"finetune.epochs={epochs}", "finetune.lr=2e-4", "finetune.min_lr=1e-6", "finetune.warmup_steps=5",
            "finetune.weight_decay=0.0", "finetune.distill.weight=1.0", "finetune.distill.temperature=1.0",
            "finetune.workers=2", "finetune.batchnorm=frozen", "finetune.evaluation_every=0"]


CASES = {
    "vit4mnist-75": ("jobs/vit4mnist.yaml", lambda e: vit4mnist(0.75, 1, e), 6),
    "vit4mnist-90": ("jobs/vit4mnist.yaml", lambda e: vit4mnist(0.9, 1, e), 6),
    "vit4mnist-90-gradual": ("jobs/vit4mnist.yaml", lambda e: vit4mnist(0.9, 3, e), 3),
    "effnet-50": ("jobs/effnet_lite0.yaml", lambda e: effnet(0.5, 1, e), 4),
}


def top1(model: torch.nn.Module, batches: list, dense: torch.nn.Module | None = None) -> dict:
    return evaluate_model(model, batches, dense_model=dense)


def run_case(name: str, epochs: int | None, out: Path) -> dict:
    recipe_path, overrides, default_epochs = CASES[name]
    epochs = epochs or default_epochs
    recipe = load_recipe(str(ROOT / recipe_path), overrides(epochs) + ["engine=local", f"output={out / name}"])
    dense, spec = load_model(recipe.model.source)
    evaluation = draw_batches(recipe.evaluation, spec, purpose="evaluation")
    dense_top1 = top1(dense, evaluation)["top1"]
    start = time.perf_counter()
    summary = run_gradual(recipe)
    wall = time.perf_counter() - start
    rows = []
    for step in summary["steps"]:
        pruned, _ = load_sparse(step["pruned"])
        tuned, manifest = load_sparse(step["finetuned"])
        rows.append({"step": step["step"], "sparsity": manifest["sparsity"],
                     "pruned_top1": top1(pruned, evaluation, dense)["top1"],
                     "finetuned_top1": top1(tuned, evaluation, dense)["top1"],
                     "prune_seconds": step["prune_seconds"], "finetune_seconds": step["finetune_seconds"]})
    final = rows[-1]
    result = {"case": name, "epochs_per_step": epochs, "steps": len(rows), "dense_top1": dense_top1,
              "sparsity": final["sparsity"], "oneshot_top1": rows[0]["pruned_top1"] if len(rows) == 1 else None,
              "final_top1": final["finetuned_top1"],
              "relative_drop": (dense_top1 - final["finetuned_top1"]) / dense_top1,
              "finetune_seconds": sum(r["finetune_seconds"] for r in rows),
              "prune_seconds": sum(r["prune_seconds"] for r in rows), "wall_seconds": wall,
              "eval_images": sum(int(x.shape[0]) for x, _ in evaluation), "per_step": rows}
    print(f"{name}: dense {dense_top1:.4f} -> final {final['finetuned_top1']:.4f} at {final['sparsity']:.2%} "
          f"({result['relative_drop']:+.2%} relative drop) in {wall:.0f} s", flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| case | steps × epochs | sparsity | dense top-1 | one-shot top-1 | finetuned top-1 | relative drop "
             "| finetune wall (2 workers) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        oneshot = f"{r['oneshot_top1']:.4f}" if r["oneshot_top1"] is not None else (
            " → ".join(f"{s['pruned_top1']:.4f}" for s in r["per_step"]) + " (per step, before finetune)")
        lines.append(f"| {r['case']} | {r['steps']} × {r['epochs_per_step']} | {r['sparsity']:.2%} | "
                     f"{r['dense_top1']:.4f} | {oneshot} | {r['final_top1']:.4f} | {r['relative_drop']:.2%} | "
                     f"{r['finetune_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--epochs", type=int, help="epochs per pruning step (default: per case)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    args = parser.parse_args(argv)
    if not Path(MNIST).is_dir():
        print(f"needs the shared data at {ROOT.parent / 'shared'}", file=sys.stderr)
        return 2
    start_local_ray(cpus=2)
    results = []
    with tempfile.TemporaryDirectory(prefix="capdist-finetune-") as tmp:
        for name in args.cases.split(","):
            results.append(run_case(name.strip(), args.epochs, Path(tmp)))
    out = Path(args.out)
    if out.exists():          # a run of some cases replaces those rows and keeps the others' latest figures
        ran = {r["case"] for r in results}
        kept = [r for r in json.loads(out.read_text())["results"] if r["case"] not in ran]
        results = sorted(kept + results, key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else 99)
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "command": " ".join(sys.argv), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
