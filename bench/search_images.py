"""What ``structured.search_images`` costs and buys on real models: the output-guided allocation search run on all
calibration images and on fewer, side by side on one plan (same curves, same latency table), with the search's
time, its passes, every candidate's output error on *all* calibration images, the allocation chosen and its top-1
on held-out images (the images and targets of bench/speed.py).

    python bench/search_images.py --case vit4mnist --images all,128,64,32
    python bench/search_images.py --case vit4mnist --images all,128,32 --starts 4    # 4 disjoint runs of images
    python bench/search_images.py --case effnet-lite0 --images all,64,32,16

A candidate is tried without shrinking the model (cap_dist/structured/trial.py: exactly the smaller model's
function). Writes ``bench/results/search_images-<case>.json``.
"""

from __future__ import annotations

import argparse
import copy
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
    weights, constants = plan.trial(counts, cfg.damp, cfg.damp_mode)
    meter = ClassificationMeter()
    with trial_weights(plan.consumers, weights, constants), torch.no_grad():
        for (x, y), d in zip(evaluation, dense_logits):
            meter.update(model(x), y, d)
    metrics = meter.compute()
    return {"top1": metrics["top1"], "eval_kl": metrics["kl"]}


def rolled(inputs: list[torch.Tensor], offset: int) -> list[torch.Tensor]:
    """The same calibration images starting at image ``offset`` (wrapping), in batches of the first's size: the
    search's first N images are then images offset..offset+N-1, and a whole probe's error is unchanged."""
    flat = torch.cat(inputs)
    return list(torch.roll(flat, -offset, 0).split(int(inputs[0].shape[0])))


def measure(case: str, settings: list[int | None], starts: int, work: Path) -> dict[str, Any]:
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
    for images, start_index in ((i, k) for i in settings for k in range(starts if i else 1)):
        run_cfg = cfg.model_copy(update={"search_images": images})
        offset = start_index * (images or 0)
        start = time.perf_counter()
        with torch.no_grad():
            found = allocate(plan, model, rolled(inputs, offset) if offset else inputs, run_cfg)
        seconds = time.perf_counter() - start - base_seconds
        row = {"search_images": images or calibration_images, "first_image": offset, "search_seconds": seconds,
               "search_passes": found.search["greedy_passes"] + found.search["refine_passes"], "chosen": found.chosen,
               "errors": found.candidates, **held_out_top1(model, plan, cfg, found.counts, evaluation, dense_logits)}
        rows.append(row)
        print(f"{case} search_images {row['search_images']:>4} from image {offset:>4}: search {seconds:6.1f} s in {row['search_passes']} passes, chose {found.chosen:<10} "
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
    parser.add_argument("--starts", type=int, default=1, help="searches per setting, on disjoint runs of images "
                                                                 "(the k-th from image k·N)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default=None, help="default: bench/results/search_images-<case>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [None if v.strip() == "all" else int(v) for v in args.images.split(",")]
    path = Path(args.results or ROOT / "bench" / "results" / f"search_images-{args.case}.json")
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.case, settings, args.starts, Path(work))
    write_json_atomic(path, {"command": " ".join(sys.argv), "threads": args.threads, **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
