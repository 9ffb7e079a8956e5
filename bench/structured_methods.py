"""Which groups a structure loses, with where the cuts go held fixed: structured CAP (greedy group OBS with exact
downdates) against one-shot group OBS scores and group magnitude, every method given the *same* counts per
structure (the allocations CAP's plan makes), so the only difference is the removal order inside each structure
(all three end with the same exact re-solve of the kept columns). The images and targets of bench/speed.py.

    python bench/structured_methods.py --case vit4mnist
    python bench/structured_methods.py --case effnet-lite0 --no-search

bench/speed.py compares the methods each with its own allocation, where the allocation's own variance (the output
search is a local search) can hide the method. Candidates are tried without shrinking the model
(cap_dist/structured/trial.py). Writes ``bench/results/structured_methods-<case>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.search_images import held_out_top1  # noqa: E402
from bench.solvers import write_json_atomic  # noqa: E402
from bench.speed import CASES, METHODS, structured_overrides  # noqa: E402
from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.engines.local import calibration_batches  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.structured.prune import StructuredPlan, allocate, plan_structured  # noqa: E402
from cap_dist.structured.trial import OutputProbe, trial_weights  # noqa: E402


def calibration_error(model: torch.nn.Module, plan: StructuredPlan, cfg, counts: dict[str, int],
                      probe: OutputProbe) -> float:
    weights, constants = plan.trial(counts, cfg.damp, cfg.damp_mode)
    with trial_weights(plan.consumers, weights, constants), torch.no_grad():
        return probe.error()


def measure(case: str, search: bool, search_images: int | None, work: Path) -> dict[str, Any]:
    spec_case = CASES[case]
    source = f"model.source={ROOT.parent / 'shared' / 'models' / spec_case['model']}"
    recipes = {m: load_recipe(str(ROOT / spec_case["recipe"]), spec_case["finetune"](1) + [source, f"output={work}/x"]
                              + structured_overrides(spec_case, m, work / "latency.json")) for m in METHODS}
    dense, spec = load_model(recipes["cap"].model.source)
    dense.eval()
    model = copy.deepcopy(dense)
    inputs = [x for x, _ in calibration_batches(recipes["cap"], spec, torch.device("cpu"))]
    evaluation = draw_batches(recipes["cap"].evaluation, spec, purpose="evaluation")
    with torch.no_grad():
        dense_logits = [dense(x) for x, _ in evaluation]
        plans = {m: plan_structured(model, inputs, recipes[m].structured) for m in METHODS}   # one latency table
        cfg = recipes["cap"].structured.model_copy(update={"search": search, "search_images": search_images})
        alloc = allocate(plans["cap"], model, inputs, cfg)
    probe = OutputProbe(model, inputs, alloc.probe.kind)
    rows = []
    for name, counts in alloc.candidate_counts.items():
        for method in METHODS:
            plan, mcfg = plans[method], recipes[method].structured
            row = {"allocation": name, "method": method,
                   "calibration_error": calibration_error(model, plan, mcfg, counts, probe),
                   **held_out_top1(model, plan, mcfg, counts, evaluation, dense_logits)}
            rows.append(row)
            print(f"{case} {name:>10} {method:>9}: calibration error {row['calibration_error']:.4f}, held-out "
                  f"top-1 {row['top1']:.4f}, KL {row['eval_kl']:.4f}", flush=True)
    return {"case": case, "chosen_by_cap": alloc.chosen, "calibration_images": probe.images,
            "eval_images": sum(int(x.shape[0]) for x, _ in evaluation), "target": cfg.target, "measure": cfg.measure,
            "counts": alloc.candidate_counts, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="vit4mnist", choices=[c for c in CASES if "recipe" in CASES[c]])
    parser.add_argument("--no-search", action="store_true", help="CAP's allocation without the output search")
    parser.add_argument("--search-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default=None, help="default: bench/results/structured_methods-<case>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.results or ROOT / "bench" / "results" / f"structured_methods-{args.case}.json")
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.case, not args.no_search, args.search_images, Path(work))
    write_json_atomic(path, {"command": " ".join(sys.argv), "threads": args.threads, **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
