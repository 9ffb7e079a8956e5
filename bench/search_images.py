"""What ``structured.search_images`` costs and buys on real models: the output-guided allocation search run on all
calibration images and on fewer, side by side on one plan (same curves, same latency table), with the search's
time, its passes, every candidate's output error on *all* calibration images, the allocation chosen and its top-1
on held-out images (the images and targets of bench/speed.py).

    python bench/search_images.py --case vit4mnist --images all,128,64,32
    python bench/search_images.py --case effnet-lite0 --images all,64,32,16

A candidate is tried without shrinking the model (cap_dist/structured/trial.py: exactly the smaller model's
function). Writes ``bench/results/search_images-<case>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.speed import CASES, structured_overrides  # noqa: E402
from bench.solvers import write_json_atomic  # noqa: E402
from cap_dist.config import StructuredConfig, load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.engines.local import calibration_batches  # noqa: E402
from cap_dist.eval import ClassificationMeter  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.structured.prune import StructuredPlan, allocate, plan_structured  # noqa: E402
from cap_dist.structured.trial import trial_weights  # noqa: E402


def held_out_top1(model: torch.nn.Module, plan: StructuredPlan, cfg: StructuredConfig, counts: dict[str, int],
                  evaluation: list, dense_logits: list[torch.Tensor]) -> dict[str, float]:
    consumer = {s.name: s.consumer for s in plan.structures}
    weights = {consumer[n]: plan.trial_weight(n, k, cfg.damp, cfg.damp_mode) for n, k in counts.items() if k}
    constants = {consumer[n]: c for n, k in counts.items() if k and (c := plan.trial_constant(n, k)) is not None}
    meter = ClassificationMeter()
    with trial_weights(plan.consumers, weights, constants), torch.no_grad():
        for (x, y), d in zip(evaluation, dense_logits):
            meter.update(model(x), y, d)
    metrics = meter.compute()
    return {"top1": metrics["top1"], "eval_kl": metrics["kl"]}


def measure(case: str, settings: list[int | None], work: Path) -> dict[str, Any]:
    spec_case = CASES[case]
    source = f"model.source={ROOT.parent / 'shared' / 'models' / spec_case['model']}"
    recipe = load_recipe(str(ROOT / spec_case["recipe"]), spec_case["finetune"](1) + [source, f"output={work}/x"]
                         + structured_overrides(spec_case, "cap", work / "latency.json"))
    dense, spec = load_model(recipe.model.source)
    dense.eval()
    model = copy.deepcopy(dense)
    inputs = [x for x, _ in calibration_batches(recipe, spec, torch.device("cpu"))]
    evaluation = draw_batches(recipe.evaluation, spec, purpose="evaluation")
    cfg: StructuredConfig = recipe.structured
    with torch.no_grad():
        plan = plan_structured(model, inputs, cfg)
        dense_logits = [dense(x) for x, _ in evaluation]
        start = time.perf_counter()
        alloc = allocate(plan, model, inputs, cfg.model_copy(update={"search": False}))
        base_seconds = time.perf_counter() - start
    calibration_images = sum(int(x.shape[0]) for x in inputs)
    rows = []
    for images in settings:
        run_cfg = cfg.model_copy(update={"search_images": images})
        start = time.perf_counter()
        with torch.no_grad():
            found = allocate(plan, model, inputs, run_cfg)
        seconds = time.perf_counter() - start - base_seconds
        row = {"search_images": images or calibration_images, "search_seconds": seconds,
               "search_passes": found.search["greedy_passes"] + found.search["refine_passes"], "chosen": found.chosen,
               "errors": found.candidates, **held_out_top1(model, plan, cfg, found.counts, evaluation, dense_logits)}
        rows.append(row)
        print(f"{case} search_images {row['search_images']:>4}: search {seconds:6.1f} s in {row['search_passes']} passes, chose {found.chosen:<10} "
              f"error {found.candidates[found.chosen]:.4g} (greedy {found.candidates['greedy']:.4g}, refined "
              f"{found.candidates['refined']:.4g}; best without search {min(alloc.candidates.values()):.4g}), "
              f"held-out top-1 {row['top1']:.4f}", flush=True)
    without = held_out_top1(model, plan, cfg, alloc.counts, evaluation, dense_logits)
    print(f"{case} without the search: chose {alloc.chosen} error {alloc.candidates[alloc.chosen]:.4g}, held-out "
          f"top-1 {without['top1']:.4f}", flush=True)
    return {"case": case, "calibration_images": calibration_images,
            "eval_images": sum(int(x.shape[0]) for x, _ in evaluation), "target": cfg.target, "measure": cfg.measure,
            "candidates_seconds": base_seconds, "without_search": {"chosen": alloc.chosen,
                                                                   "errors": alloc.candidates, **without},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="vit4mnist", choices=[c for c in CASES if "recipe" in CASES[c]])
    parser.add_argument("--images", default="all,128,64,32", help="comma-separated search_images values; all = "
                                                                   "every calibration image")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default=None, help="default: bench/results/search_images-<case>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [None if v.strip() == "all" else int(v) for v in args.images.split(",")]
    path = Path(args.results or ROOT / "bench" / "results" / f"search_images-{args.case}.json")
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.case, settings, Path(work))
    write_json_atomic(path, {"command": " ".join(sys.argv), "threads": args.threads, **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
