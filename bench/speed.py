"""End-to-end speed of structured pruning, measured: latency of the dense, structured and structured + int8 models in
torch eager and ONNX Runtime; accuracy one-shot (structured CAP vs group magnitude vs one-shot group OBS at the same
target; with ``measure: latency`` all three on one table, timed by the first: equal predicted latency) and after a Ray Train recovery of the CAP model.

    python bench/speed.py                                  # every case (timing needs a quiet machine)
    python bench/speed.py --quick --out DIR                # vit4mnist alone (< 20 min on 2 cores), leaves the
                                                           # recovered model at DIR/vit4mnist-structured
    python bench/speed.py --cases vitb16-shape --threads 2

Cases:
* ``vit4mnist``: the real MNIST ViT (../shared), MLP units, heads and whole attention / MLP branches removed to
  keep 60 % of its *measured* latency at batch 1 (``structured.measure: latency``, ``latency_batch: 1``,
  ``branches: true``: the goal here is speed, MACs under-price its heads, and at batch 1 a model this small is
  per-call overhead that only removed modules save).
  Calibrate on 512 of MNIST test images 0..7,999, finetune (distil from the dense model, Ray Train, 2 workers) on
  0..7,999, evaluate on 8,000..9,999. Latency at batch 1, 64, 256.
* ``effnet-lite0``: the real EfficientNet-Lite0 (../shared): expansion channels removed; calibrate and finetune on
  ImageNet samples 0..599, evaluate on 600..999 (as bench/finetune.py). Latency at batch 1 and 64.
* ``vitb16-shape``: a ViT-B/16 (random weights: the latency of its shapes) whose MLP widths and heads are cut
  uniformly to the compute target; no accuracy. Latency at batch 1 and 64.

Latency: median wall time of ``--reps`` calls after warm-up, ``--threads`` intra-op threads for torch and ORT alike.
int8: torch's dynamic int8 Linear (``torch.ao.quantization.quantize_dynamic``) in eager, ONNX Runtime's dynamic int8
MatMul/Gemm for ORT (:func:`cap_dist.deploy.quantize_int8`). Writes ``bench/results/speed.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.finetune import effnet, vit4mnist  # noqa: E402
from bench.scaling import start_local_ray  # noqa: E402
from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.deploy import export_onnx, ort_session, quantize_int8  # noqa: E402
from cap_dist.engines import prune  # noqa: E402
from cap_dist.eval import evaluate_model  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.models.structures import apply_structure_shapes, find_structures  # noqa: E402
from cap_dist.output import load_sparse  # noqa: E402
from cap_dist.structured.costs import module_macs  # noqa: E402

METHODS = ("cap", "obs", "magnitude")


def structured_overrides(case: dict[str, Any], method: str, latency_table: Path | None = None) -> list[str]:
    """The case's structured step as recipe overrides; with ``latency_table`` every method is allocated on one
    timed table (the first writes it), so the methods are compared at equal predicted latency."""
    table = f"latency_table: '{latency_table}', " if latency_table is not None and case["measure"] == "latency" else ""
    return ["engine=local", "prune.sparsity=0", "schedule.first=null",
            f"structured={{target: {case['target']}, measure: {case['measure']}, {table}"
            f"latency_batch: {case.get('latency_batch', 64)}, multiple_of: {case.get('multiple_of', 1)}, "
            f"method: {method}, branches: {str(case.get('branches', False)).lower()}, "
            f"structures: [{', '.join(case['structures'])}]}}"]


CASES: dict[str, dict[str, Any]] = {
    "vit4mnist": {"recipe": "jobs/vit4mnist.yaml", "model": "vit4mnist", "finetune": lambda e: vit4mnist(0.0, 1, e),
                  "epochs": 6,
                  "quick_epochs": 2, "target": 0.6, "measure": "latency", "latency_batch": 1, "branches": True,
                  "structures": ["mlp", "heads"], "batches": (1, 64, 256)},
    "effnet-lite0": {"recipe": "jobs/effnet_lite0.yaml", "model": "tf_efficientnet_lite0",
                     "finetune": lambda e: effnet(0.0, 1, e), "epochs": 4,
                     "quick_epochs": 1, "target": 0.75, "measure": "flops", "multiple_of": 16, "structures": ["channels"],
                     "batches": (1, 64)},
    "vitb16-shape": {"shape_only": "vit_base_patch16_224", "target": 0.5, "batches": (1, 64)},
}


# ----------------------------------------------------------------------------------------------------
# Latency


ROUNDS = 5


def torch_call(model: nn.Module, shape: tuple[int, ...]):
    x = torch.randn(shape)

    def call() -> None:
        with torch.inference_mode():
            model(x)
    return call


def ort_call(session, shape: tuple[int, ...]):
    feed = {"images": torch.randn(shape).numpy()}
    return lambda: session.run(None, feed)


def torch_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch.ao.quantization's deprecation notice
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def interleaved_ms(calls: dict[tuple, Any], reps: int, rounds: int = ROUNDS, warmup: int = 2) -> dict[tuple, float]:
    """Median milliseconds of every call, timed in ``rounds`` interleaved rounds of ``reps // rounds`` calls each
    (at least one), so a drift of the machine's speed (other work, clocks) hits dense and pruned alike: timing one
    model after the other made batch-1 ratios swing by 1.5x between runs of the same two models."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[tuple, list[float]] = {key: [] for key in calls}
    per_round = max(1, reps // rounds)
    for _ in range(rounds):
        for key, call in calls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                samples[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(v) for key, v in samples.items()}


def latency_rows(models: dict[str, nn.Module], image: tuple[int, int, int], batches: tuple[int, ...], reps: int,
                 threads: int, workdir: Path) -> list[dict[str, Any]]:
    """Every model at every batch in torch eager (float and int8) and ORT (float and int8); at each batch the
    variants of one runtime are timed interleaved (ORT's intra-op threads spin for a while after each call, which
    slowed torch calls timed between them 2-3x)."""
    runners: dict[tuple[str, str, str], Any] = {}
    for name, model in models.items():
        onnx_path = str(workdir / f"{name}.onnx")
        export_onnx(model, torch.zeros((2, *image)), onnx_path)
        int8_path = quantize_int8(onnx_path, str(workdir / f"{name}.int8.onnx"))
        runners[(name, "torch", "fp32")] = ("torch", model)
        runners[(name, "torch", "int8")] = ("torch", torch_int8(model))
        runners[(name, "ort", "fp32")] = ("ort", ort_session(onnx_path, threads))
        runners[(name, "ort", "int8")] = ("ort", ort_session(int8_path, threads))
    rows = []
    for batch in batches:
        shape = (batch, *image)
        n = max(ROUNDS, reps // max(1, batch // 16))                # fewer repetitions of the big batches
        for runtime in ("torch", "ort"):        # one runtime at a time: ORT's pool spins between its calls
            calls = {key: (torch_call(r, shape) if kind == "torch" else ort_call(r, shape))
                     for key, (kind, r) in runners.items() if kind == runtime}
            for (name, rt, precision), ms in interleaved_ms(calls, n).items():
                rows.append({"model": name, "runtime": rt, "precision": precision, "batch": batch, "ms": ms})
            print("  " + ", ".join(f"{r['model']} {r['runtime']} {r['precision']} b{r['batch']}: {r['ms']:.2f} ms"
                                   for r in rows[-len(calls):]), flush=True)
    return rows


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's speed-up over the dense fp32 model in the same runtime at the same batch."""
    base = {(r["runtime"], r["batch"]): r["ms"] for r in rows if r["model"] == "dense" and r["precision"] == "fp32"}
    return [{**r, "speedup": base[(r["runtime"], r["batch"])] / r["ms"]} for r in rows]


# ----------------------------------------------------------------------------------------------------
# Cases


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def macs_of(model: nn.Module, image: tuple[int, int, int]) -> float:
    return sum(module_macs(model.eval(), torch.zeros((1, *image))).values())


def kept_by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The fraction of each kind's groups (MLP units, heads, channels) the structured output kept."""
    kinds: dict[str, list[int]] = {}
    for row in rows:
        kept, groups = kinds.setdefault(row["kind"], [0, 0])
        kinds[row["kind"]] = [kept + row["kept"], groups + row["groups"]]
    return {k: round(kept / groups, 4) for k, (kept, groups) in kinds.items()}


def real_case(name: str, case: dict[str, Any], out: Path, quick: bool, reps: int, threads: int,
              recover: bool, work: Path, epochs: int | None = None,
              methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    recipe_path = str(ROOT / case["recipe"])
    epochs = epochs or (case["quick_epochs"] if quick else case["epochs"])
    source = f"model.source={ROOT.parent / 'shared' / 'models' / case['model']}"   # absolute: outputs load anywhere
    recipe = load_recipe(recipe_path, case["finetune"](epochs) + [source, f"output={work}/x"]
                         + structured_overrides(case, "cap"))
    dense, spec = load_model(recipe.model.source)
    evaluation = draw_batches(recipe.evaluation, spec, purpose="evaluation")
    image = (int(spec.get("channels", 3)), int(spec["size"]), int(spec["size"]))
    dense_macs = macs_of(dense, image)
    dense_top1 = evaluate_model(dense, evaluation)["top1"]
    oneshot = {}
    for method in methods:
        r = load_recipe(recipe_path, case["finetune"](epochs) + [source, f"output={work}/{name}-{method}"]
                        + structured_overrides(case, method, work / f"{name}-latency.json"))
        start = time.perf_counter()
        prune(r)
        model, manifest = load_sparse(r.output)
        metrics = evaluate_model(model, evaluation, dense_model=dense)
        chosen = {row.get("allocation") for row in manifest.get("structured", [])}
        oneshot[method] = {"top1": metrics["top1"], "agreement": metrics["agreement"], "kl": metrics["kl"],
                           "allocation": chosen.pop() if len(chosen) == 1 else None,
                           "macs_kept": macs_of(model, image) / dense_macs,
                           "params_kept": sum(p.numel() for p in model.parameters()) / sum(
                               p.numel() for p in dense.parameters()),
                           "kept_by_kind": kept_by_kind(manifest.get("structured", [])),
                           "prune_seconds": time.perf_counter() - start, "output": r.output}
        print(f"{name} one-shot {method}: top-1 {metrics['top1']:.4f} (dense {dense_top1:.4f}), "
              f"MACs kept {oneshot[method]['macs_kept']:.3f}, groups kept {oneshot[method]['kept_by_kind']}",
              flush=True)
    result: dict[str, Any] = {"case": name, "target": case["target"], "measure": case["measure"],
                              "multiple_of": case.get("multiple_of", 1),
                              "latency_batch": case.get("latency_batch"), "dense_top1": dense_top1,
                              "eval_images": sum(int(x.shape[0]) for x, _ in evaluation), "oneshot": oneshot}
    structured, _ = load_sparse(oneshot["cap"]["output"])
    if recover:
        from cap_dist.finetune.trainer import finetune

        start_local_ray(cpus=2)
        target = out / f"{name}-structured"
        start = time.perf_counter()
        finetune(recipe, oneshot["cap"]["output"], str(target))
        structured, _ = load_sparse(str(target))
        metrics = evaluate_model(structured, evaluation, dense_model=dense)
        result["recovered"] = {"top1": metrics["top1"], "agreement": metrics["agreement"], "epochs": epochs,
                               "relative_drop": (dense_top1 - metrics["top1"]) / dense_top1,
                               "finetune_seconds": time.perf_counter() - start, "output": str(target)}
        print(f"{name} recovered: top-1 {metrics['top1']:.4f} ({result['recovered']['relative_drop']:+.2%} relative "
              f"to dense) -> {target}", flush=True)
    _stop_ray()                                  # nothing of Ray's may run while latency is timed
    models = {"dense": dense.eval(), "structured": structured.eval()}
    result["latency"] = speedups(latency_rows(models, image, case["batches"], reps, threads, work))
    return result


def shape_case(name: str, case: dict[str, Any], reps: int, threads: int, work: Path) -> dict[str, Any]:
    """A random-weight model cut uniformly to the target's MACs: latency of the shapes alone."""
    import timm

    image = (3, 224, 224)

    def cut(fraction: float, device: str) -> nn.Module:
        with torch.device(device):
            model = timm.create_model(case["shape_only"], pretrained=False).eval()
            found = find_structures(model, ("mlp", "heads"))
            apply_structure_shapes(model, {s.name: {"kind": s.kind, "groups": max(1, round(fraction * s.groups))}
                                           for s in found})
        return model

    def macs(model: nn.Module) -> float:
        return sum(module_macs(model, torch.zeros((1, *image), device="meta")).values())

    dense_macs = macs(cut(1.0, "meta"))
    lo, hi = 0.0, 1.0
    for _ in range(20):                         # the uniform kept fraction that meets the target (shapes only: meta)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if macs(cut(mid, "meta")) / dense_macs <= case["target"] else (lo, mid)
    torch.manual_seed(0)
    dense, best = cut(1.0, "cpu"), cut(lo, "cpu")
    result = {"case": name, "target": case["target"], "macs_kept": macs_of(best, image) / macs_of(dense, image),
              "kept_fraction_of_groups": lo}
    result["latency"] = speedups(latency_rows({"dense": dense, "structured": best}, image, case["batches"], reps,
                                              threads, work))
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| case | model | batch | torch fp32 | torch int8 | ORT fp32 | ORT int8 |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        cells: dict[tuple[str, int], dict[str, str]] = {}
        for r in res["latency"]:
            cells.setdefault((r["model"], r["batch"]), {})[f"{r['runtime']} {r['precision']}"] = (
                f"{r['ms']:.2f} ms ({r['speedup']:.2f}×)")
        for (model, batch), c in cells.items():
            lines.append(f"| {res['case']} | {model} | {batch} | {c['torch fp32']} | {c['torch int8']} | "
                         f"{c['ort fp32']} | {c['ort int8']} |")
    acc = ["", "| case | dense top-1 | CAP one-shot | OBS one-shot | magnitude one-shot | CAP recovered |",
           "|---|---|---|---|---|---|"]
    for res in results:
        if "oneshot" not in res:
            continue
        o = res["oneshot"]
        rec = res.get("recovered")
        recovered = f"{rec['top1']:.4f} ({rec['relative_drop']:+.2%})" if rec is not None else "–"
        acc.append(f"| {res['case']} | {res['dense_top1']:.4f} | "
                   + " | ".join(f"{o[m]['top1']:.4f} (MACs {o[m]['macs_kept']:.2f})" if m in o else "–"
                                for m in METHODS)
                   + f" | {recovered} |")
    return "\n".join(lines + acc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="vit4mnist alone, short recovery (< 20 min)")
    parser.add_argument("--out", default=None, help="folder for the recovered models (default: a temporary one)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "speed.json"))
    parser.add_argument("--reps", type=int, default=60, help="timed calls per latency (fewer at big batches)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    parser.add_argument("--no-recovery", action="store_true", help="skip the Ray Train recovery")
    parser.add_argument("--epochs", type=int, default=None, help="recovery epochs (default: per case; --quick: fewer)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes to time (default: per case)")
    parser.add_argument("--target", type=float, default=None, help="structured.target of the real cases "
                                                                   "(default: per case)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated structured methods to compare, of {', '.join(METHODS)} (cap first)")
    parser.add_argument("--multiple-of", type=int, default=None,
                        help="structured.multiple_of of the real cases (default: per case, 1)")
    parser.add_argument("--measure", choices=("flops", "params", "latency"), default=None,
                        help="structured.measure of the real cases (default: per case)")
    args = parser.parse_args(argv)
    cases = ["vit4mnist"] if args.quick else [c.strip() for c in args.cases.split(",")]
    methods = tuple(m.strip() for m in args.methods.split(","))
    if not methods or methods[0] != "cap" or set(methods) - set(METHODS):
        print(f"--methods must start with cap and name only {', '.join(METHODS)}", file=sys.stderr)
        return 2
    unknown = set(cases) - set(CASES)
    if unknown:
        print(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if any("recipe" in CASES[c] for c in cases) and not (ROOT.parent / "shared" / "models").is_dir():
        print(f"needs the shared models and data at {ROOT.parent / 'shared'}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    recover = not args.no_recovery
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="capdist-speed-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="capdist-speed-work-") as tmp:
        for name in cases:
            work = Path(tmp) / name
            work.mkdir()
            case = dict(CASES[name])
            if args.batches:
                case["batches"] = tuple(int(b) for b in args.batches.split(","))
            if "recipe" in case:
                case["target"] = args.target or case["target"]
                case["measure"] = args.measure or case["measure"]
                case["multiple_of"] = args.multiple_of or case.get("multiple_of", 1)
            if "shape_only" in case:
                results.append(shape_case(name, case, args.reps, args.threads, work))
            else:
                results.append(real_case(name, case, out, args.quick, args.reps, args.threads, recover, work,
                                         args.epochs, methods))
    print(table(results))
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "command": " ".join(sys.argv), "quick": args.quick, "results": results}
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(meta, indent=1))
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
