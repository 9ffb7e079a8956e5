"""One-shot pruning of real models, every method side by side: top-1 and agreement with dense.

    python bench/oneshot.py                   # both models, all methods, 50 % / 75 % / 2:4 (~15 min, 2 cores)
    python bench/oneshot.py --models vit4mnist --cases 50%

Sequential mode for every method; `cap` also in independent mode.  Recipes: jobs/vit4mnist.yaml
(calibrate on MNIST test 0..511, evaluate on 512..9,999) and jobs/effnet_lite0.yaml (the first half of
the ImageNet samples, 500 images, calibrate; the second half evaluates).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.eval import evaluate_model  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.core import select_layers  # noqa: E402
from cap_dist.engines.local import prune_model  # noqa: E402

CASES = {"50%": ["prune.sparsity=0.5"], "75%": ["prune.sparsity=0.75"], "2:4": ["prune.pattern=2:4"]}
METHODS = ["magnitude", "wanda", "obs", "sparsegpt", "cap"]
ABLATION = {                  # cap's steps one at a time (sequential mode); the last is cap's recipe default
    "cap(plain, BN kept)": ["prune.resolve=false", "prune.admm_iterations=0", "prune.batchnorm=keep"],
    "cap+resolve (BN kept)": ["prune.admm_iterations=0", "prune.batchnorm=keep"],
    "cap+admm+resolve (BN kept)": ["prune.batchnorm=keep"],
}
RECIPES = {"vit4mnist": "jobs/vit4mnist.yaml", "effnet_lite0": "jobs/effnet_lite0.yaml"}


def run(model_name: str, cases: list[str], results: list[dict], methods: list[str], ablation: list[str],
        independent: bool = True, overrides: list[str] | None = None) -> None:
    overrides = overrides or []
    base = load_recipe(str(ROOT / RECIPES[model_name]), overrides)
    dense, spec = load_model(base.model.source)
    calib = draw_batches(base.calibration, spec, purpose="calibration")
    evaluation = draw_batches(base.evaluation, spec, purpose="evaluation")
    metrics = evaluate_model(dense, evaluation)
    results.append(dict(model=model_name, case="dense", method="dense", mode="-", **metrics, seconds=0.0))
    print(f"{model_name:<13} dense                          top1 {metrics['top1']:.4f}", flush=True)
    for case in cases:
        runs = [(m, m, "sequential", []) for m in methods]
        runs += [("cap", "cap", "independent", [])] if independent and "cap" in methods else []
        runs += [(label, "cap", "sequential", extra) for label, extra in ABLATION.items() if label in ablation]
        for label, method, mode, extra in runs:
            recipe = load_recipe(str(ROOT / RECIPES[model_name]),
                                 overrides + CASES[case] + [f"prune.method={method}", f"prune.mode={mode}"] + extra)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            records, _ = prune_model(recipe, model, calib, select_layers(model, recipe.model))
            seconds = time.perf_counter() - start
            m = evaluate_model(model, evaluation, dense_model=dense)
            numel = sum(r.numel for r in records)
            sparsity = sum(r.sparsity * r.numel for r in records) / numel
            results.append(dict(model=model_name, case=case, method=label, mode=mode, seconds=seconds,
                                sparsity=sparsity, overrides=extra, **m))
            print(f"{model_name:<13} {case:>4} {label:<10} {mode:<11} top1 {m['top1']:.4f} "
                  f"agree {m.get('agreement', float('nan')):.4f}  {seconds:6.1f}s", flush=True)


def table(results: list[dict]) -> str:
    lines = ["| model | case | method | mode | top-1 | agreement with dense | prune time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        agree = f"{r['agreement']:.4f}" if "agreement" in r else "—"
        lines.append(f"| {r['model']} | {r['case']} | {r['method']} | {r['mode']} | {r['top1']:.4f} | {agree} | "
                     f"{r['seconds']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--ablation", nargs="*", default=None, choices=list(ABLATION),
                        help="also cap with its steps switched off one by one (all, or the variants named)")
    parser.add_argument("--no-independent", action="store_true", help="skip `cap` in independent mode")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "oneshot.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every run (e.g. calibration.samples=500)")
    args = parser.parse_args(argv)
    if not (ROOT.parent / "shared").is_dir():
        print(f"this benchmark needs the shared models and data at {ROOT.parent / 'shared'}")
        return 2
    torch.manual_seed(0)
    results: list[dict] = []
    start = time.perf_counter()
    for name in args.models:
        ablation = [] if args.ablation is None else (args.ablation or list(ABLATION))
        run(name, args.cases, results, args.methods, ablation, independent=not args.no_independent,
            overrides=args.set)
    text = table(results)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(command="python bench/oneshot.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       seconds=time.perf_counter() - start, machine=platform.platform(),
                       threads=torch.get_num_threads(), results=results, table=text), f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
