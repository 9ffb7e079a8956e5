"""Why an allocation of structured pruning wins or loses on a real model, measured: per structure the counts each
allocation takes, its layer loss and what it costs the whole model (output error on the calibration images with
that structure alone cut); per candidate allocation its calibration output error and its top-1 on the evaluation
images (the images and target of bench/speed.py).

    python bench/structured_allocation.py --case effnet-lite0 --methods cap,obs,magnitude
    python bench/structured_allocation.py --case vit4mnist

Candidates are tried without shrinking the model: a removed group is its consumer columns zeroed and the kept
ones re-solved (cap_dist/structured/trial.py), which is exactly the physically smaller model's function.
Writes ``bench/results/structured_allocation-<case>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.speed import CASES, structured_overrides  # noqa: E402
from cap_dist.config import StructuredConfig, load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.engines.local import calibration_batches  # noqa: E402
from cap_dist.eval import ClassificationMeter  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.structured.allocate import blend_counts  # noqa: E402
from cap_dist.structured.prune import allocate, plan_structured  # noqa: E402
from cap_dist.structured.trial import trial_weights  # noqa: E402

BLENDS = (0.25, 0.5, 0.75)


def block_facts(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """What may make a structure's layer loss a poor guide to the model's: a BatchNorm rescaling the consumer's
    output channels (its gain's spread) and a residual sum around the block."""
    module = model.get_submodule(name)
    out: dict[str, Any] = {"skip": bool(getattr(module, "has_skip", False))}
    bn = getattr(module, "bn3", None)
    if isinstance(bn, torch.nn.BatchNorm2d):
        gain = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs().detach()
        out.update(bn_gain_rms=float(gain.pow(2).mean().sqrt()), bn_gain_max_over_min=float(gain.max() / gain.min()))
    return out


def measure(case: str, method: str, work: Path) -> dict[str, Any]:
    spec_case = CASES[case]
    source = f"model.source={ROOT.parent / 'shared' / 'models' / spec_case['model']}"
    recipe = load_recipe(str(ROOT / spec_case["recipe"]), spec_case["finetune"](1) + [source, f"output={work}/x"]
                         + structured_overrides(spec_case, method, work / "latency.json"))
    dense, spec = load_model(recipe.model.source)
    dense.eval()
    model = copy.deepcopy(dense)
    inputs = [x for x, _ in calibration_batches(recipe, spec, torch.device("cpu"))]
    evaluation = draw_batches(recipe.evaluation, spec, purpose="evaluation")
    cfg: StructuredConfig = recipe.structured.model_copy(update={"allocation": "calibrated"})
    start = time.perf_counter()
    with torch.no_grad():
        plan = plan_structured(model, inputs, cfg)
        curves_s = time.perf_counter() - start
        alloc = allocate(plan, model, inputs, cfg)
    alloc_s = time.perf_counter() - start - curves_s
    counts_of = dict(alloc.candidate_counts)
    for alpha in BLENDS:                         # blends of the calibrated and uniform counts: not chosen by the
        counts_of[f"calibrated{alpha:g}+uniform"] = blend_counts(                # library (see the README)
            counts_of["calibrated"], counts_of["uniform"], alpha, plan.valid)
    with torch.no_grad():
        dense_logits = [dense(x) for x, _ in evaluation]
    candidates = {}
    for name, counts in counts_of.items():
        weights, constants = plan.trial(counts, cfg.damp, cfg.damp_mode)
        meter = ClassificationMeter()
        with trial_weights(plan.consumers, weights, constants), torch.no_grad():
            calibration = alloc.candidates[name] if name in alloc.candidates else alloc.probe.error()
            for (x, y), d in zip(evaluation, dense_logits):
                meter.update(model(x), y, d)
        metrics = meter.compute()
        kept = 1.0 - sum(plan.unit[n] * k for n, k in counts.items()) / plan.total
        candidates[name] = {"calibration_error": calibration, "top1": metrics["top1"], "eval_kl": metrics["kl"],
                            "macs_kept": kept, "chosen": name == alloc.chosen, "counts": counts}
        print(f"{case} {method} {name:>22}: calibration KL {calibration:.4f}, eval top-1 "
              f"{metrics['top1']:.4f}, eval KL {metrics['kl']:.4f}, kept {kept:.3f}"
              + (" (chosen)" if name == alloc.chosen else ""), flush=True)
    rows = []
    for s in plan.structures:
        curve = plan.curves[s.name].curve
        k_glob = counts_of["global"][s.name]
        with trial_weights(plan.consumers, *plan.trial({s.name: k_glob}, cfg.damp, cfg.damp_mode)), torch.no_grad():
            alone_global = alloc.probe.error()
        k_probe = alloc.probes[s.name]
        rows.append({"structure": s.name, "groups": s.groups, "macs_per_group": plan.unit[s.name],
                     **block_facts(model, s.name),
                     **{f"k_{c}": counts_of[c][s.name] for c in ("global", "uniform", "calibrated")},
                     "probe_k": k_probe, "layer_loss_at_probe": float(curve[k_probe]),
                     "output_error_at_probe": alloc.sensitivity[s.name],
                     "layer_loss_at_global": float(curve[k_glob]), "output_error_alone_at_global": alone_global})
    print(f"{'structure':<12} {'G':>5} {'skip':>5} {'bnrms':>6} {'k_glob':>6} {'k_uni':>6} {'k_cal':>6} "
          f"{'L@probe':>8} {'E@probe':>8} {'E/L':>8} {'L@glob':>8} {'E@glob':>8}")
    for r in rows:
        ratio = r["output_error_at_probe"] / r["layer_loss_at_probe"] if r["layer_loss_at_probe"] > 0 else float("nan")
        print(f"{r['structure']:<12} {r['groups']:>5} {r['skip']!s:>5} {r.get('bn_gain_rms', float('nan')):>6.2f} "
              f"{r['k_global']:>6} {r['k_uniform']:>6} {r['k_calibrated']:>6} {r['layer_loss_at_probe']:>8.4f} "
              f"{r['output_error_at_probe']:>8.4f} {ratio:>8.3f} {r['layer_loss_at_global']:>8.4f} "
              f"{r['output_error_alone_at_global']:>8.4f}", flush=True)
    return {"case": case, "method": method, "chosen": alloc.chosen, "curves_seconds": curves_s,
            "allocation_seconds": alloc_s, "candidates": candidates, "structures": rows,
            "calibration_images": sum(int(x.shape[0]) for x in inputs),
            "eval_images": sum(int(x.shape[0]) for x, _ in evaluation)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="effnet-lite0", choices=[c for c in CASES if "recipe" in CASES[c]])
    parser.add_argument("--methods", default="cap", help="comma-separated, of cap, obs, magnitude")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default=None, help="default: bench/results/structured_allocation-<case>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.results or ROOT / "bench" / "results" / f"structured_allocation-{args.case}.json")
    results = []
    for method in args.methods.split(","):                     # written after every method: a long run keeps them
        results.append(measure(args.case, method.strip(), ROOT / "runs" / "structured-allocation"))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": " ".join(sys.argv), "threads": args.threads, "results": results},
                                  indent=1))
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
