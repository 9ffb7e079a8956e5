"""Beyond unstructured: N:M and quantization with CAP, the compact export's size, and CPU inference speed.

    python bench/compose.py                        # accuracy + sizes + speed (~15 min on 2 cores)
    python bench/compose.py --parts speed

Accuracy: the recipes jobs/vit4mnist.yaml and jobs/effnet_lite0.yaml (sequential mode, their calibration and
evaluation images), pruned with `cap` and `sparsegpt` to 2:4, and `cap` 50 % / 2:4 with GPTQ int8 / int4
(per output channel) on top; each written as a pruning output and exported to `model.compact.safetensors`
(cap_dist.compact), whose size is compared with the dense `model.safetensors`.

Speed (CPU, torch threads = 2, median of repeated runs, batch 1 and 64): the dense model, the same model with its
pruned Linear layers as torch CSR sparse matrices (MKL sparse kernels), and torch's dynamic int8 quantization of
the Linear layers (fbgemm); plus one ViT-B-sized MLP layer (768→3072) at 50–95 % sparsity. N:M (2:4) has no CPU
kernel in torch, so a 2:4 model runs at dense speed here.
Writes bench/results/compose.json and prints the tables.
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cap_dist.compact import compact_from_output  # noqa: E402
from cap_dist.config import load_recipe  # noqa: E402
from cap_dist.data.draw import draw_batches  # noqa: E402
from cap_dist.eval import evaluate_model  # noqa: E402
from cap_dist.models.source import load_model  # noqa: E402
from cap_dist.output import load_sparse  # noqa: E402
from cap_dist.engines import prune  # noqa: E402

RECIPES = {"vit4mnist": "jobs/vit4mnist.yaml", "effnet_lite0": "jobs/effnet_lite0.yaml"}
CASES = {
    "50% cap": ["prune.method=cap", "prune.sparsity=0.5"],
    "50% cap + int8": ["prune.method=cap", "prune.sparsity=0.5", "prune.quantize.bits=8"],
    "2:4 cap": ["prune.method=cap", "prune.pattern=2:4"],
    "2:4 sparsegpt": ["prune.method=sparsegpt", "prune.pattern=2:4"],
    "2:4 cap + int4": ["prune.method=cap", "prune.pattern=2:4", "prune.quantize.bits=4"],
    "2:4 sparsegpt + int4": ["prune.method=sparsegpt", "prune.pattern=2:4", "prune.quantize.bits=4"],
    "75% cap": ["prune.method=cap", "prune.sparsity=0.75"],
}


# ---------------------------------------------------------------------------------------------- accuracy


def accuracy(model_name: str, out: Path) -> list[dict]:
    base = load_recipe(str(ROOT / RECIPES[model_name]))
    dense, spec = load_model(base.model.source)
    evaluation = draw_batches(base.evaluation, spec, purpose="evaluation")
    dense_top1 = evaluate_model(dense, evaluation)["top1"]
    rows = [{"model": model_name, "case": "dense", "top1": dense_top1, "sparsity": 0.0}]
    print(f"{model_name:<13} dense                   top1 {dense_top1:.4f}", flush=True)
    for case, overrides in CASES.items():
        folder = out / model_name / case.replace(" ", "_").replace("%", "").replace(":", "-").replace("+", "")
        recipe = load_recipe(str(ROOT / RECIPES[model_name]), overrides + ["engine=local", f"output={folder}"])
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune(recipe)
        seconds = time.perf_counter() - start
        model, manifest = load_sparse(str(folder))
        metrics = evaluate_model(model, evaluation, dense_model=dense)
        sizes = compact_from_output(str(folder))
        rows.append({"model": model_name, "case": case, "top1": metrics["top1"], "agreement": metrics["agreement"],
                     "sparsity": manifest["sparsity"], "seconds": seconds, "dense_bytes": sizes["dense_bytes"],
                     "compact_bytes": sizes["compact_bytes"], "compact_ratio": sizes["ratio"],
                     "quantized_layers": sizes["quantized_layers"], "output": str(folder)})
        print(f"{model_name:<13} {case:<23} top1 {metrics['top1']:.4f}  size {sizes['ratio']:.3f} of dense "
              f"({sizes['quantized_layers']} layers as codes)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- speed


class CsrLinear(nn.Module):
    """A Linear whose weight is a CSR sparse matrix: y = (W_csr @ xᵀ)ᵀ + b with torch's sparse kernels."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def with_csr_linears(model: nn.Module, names: set[str]) -> nn.Module:
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, CsrLinear(module))
    return model


def int8_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def latency(fn, x: torch.Tensor, min_seconds: float = 2.0, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < min_seconds or len(times) < 5:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_speed(model_name: str, accuracy_rows: list[dict]) -> list[dict]:
    import copy

    by_case = {r["case"]: r for r in accuracy_rows if r["model"] == model_name}
    dense, spec = load_model(load_recipe(str(ROOT / RECIPES[model_name])).model.source)
    size = spec.get("size", 224)
    channels = spec.get("channels", 3)
    variants: list[tuple[str, nn.Module, float | None]] = [("dense", dense, by_case["dense"]["top1"])]
    for case in ("50% cap", "75% cap"):
        if case in by_case:
            sparse, manifest = load_sparse(by_case[case]["output"])
            layers = {row["layer"] for row in manifest["layers"]}
            variants.append((f"{case}, dense kernels", sparse, by_case[case]["top1"]))
            variants.append((f"{case}, CSR Linear", with_csr_linears(copy.deepcopy(sparse), layers),
                             by_case[case]["top1"]))
    if "50% cap + int8" in by_case:
        q, _ = load_sparse(by_case["50% cap + int8"]["output"])
        variants.append(("50% cap + int8, int8 kernels", int8_dynamic(q), by_case["50% cap + int8"]["top1"]))
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, channels, size, size)
        base = None
        for name, module, top1 in variants:
            module.eval()
            seconds = latency(module, x)
            base = base or seconds
            rows.append({"model": model_name, "variant": name, "batch": batch, "latency_ms": 1e3 * seconds,
                         "images_per_s": batch / seconds, "speedup": base / seconds, "top1": top1})
            print(f"{model_name:<13} batch {batch:<3} {name:<30} {1e3 * seconds:8.2f} ms  {base / seconds:5.2f}×",
                  flush=True)
    return rows


def layer_speed() -> list[dict]:
    """One ViT-B MLP layer (768 → 3072) at batch 1 and 64 (197 tokens per image)."""
    torch.manual_seed(0)
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch * 197, 768)
        dense = nn.Linear(768, 3072).eval()
        base = latency(dense, x)
        rows.append({"layer": "768→3072", "variant": "dense", "batch": batch, "latency_ms": 1e3 * base,
                     "speedup": 1.0})
        q = int8_dynamic(nn.Sequential(dense)).eval()
        t = latency(q, x)
        rows.append({"layer": "768→3072", "variant": "int8 dynamic", "batch": batch, "latency_ms": 1e3 * t,
                     "speedup": base / t})
        for sparsity in (0.5, 0.75, 0.9, 0.95):
            pruned = nn.Linear(768, 3072).eval()
            with torch.no_grad():
                w = dense.weight.clone()
                w[w.abs() < w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
                pruned.weight.copy_(w)
                pruned.bias.copy_(dense.bias)
            t = latency(CsrLinear(pruned), x)
            rows.append({"layer": "768→3072", "variant": f"CSR {sparsity:.0%}", "batch": batch,
                         "latency_ms": 1e3 * t, "speedup": base / t})
        for r in rows[-6:]:
            print(f"layer 768→3072 batch {batch:<3} {r['variant']:<14} {r['latency_ms']:8.2f} ms  "
                  f"{r['speedup']:5.2f}×", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ output


def tables(results: dict) -> str:
    out = []
    if results.get("accuracy"):
        out += ["| model | case | top-1 | agreement | sparsity | compact size / dense |", "|---|---|---|---|---|---|"]
        for r in results["accuracy"]:
            ratio = f"{r['compact_ratio']:.3f}" if "compact_ratio" in r else "1"
            agree = f"{r['agreement']:.4f}" if "agreement" in r else "-"
            out.append(f"| {r['model']} | {r['case']} | {r['top1']:.4f} | {agree} | {r['sparsity']:.2%} | {ratio} |")
        out.append("")
    if results.get("model_speed"):
        out += ["| model | variant | batch | latency (ms) | images/s | speedup vs dense | top-1 |",
                "|---|---|---|---|---|---|---|"]
        for r in results["model_speed"]:
            out.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['latency_ms']:.2f} | "
                       f"{r['images_per_s']:.1f} | {r['speedup']:.2f}× | {r['top1']:.4f} |")
        out.append("")
    if results.get("layer_speed"):
        out += ["| layer | variant | batch | latency (ms) | speedup vs dense |", "|---|---|---|---|---|"]
        for r in results["layer_speed"]:
            out.append(f"| {r['layer']} | {r['variant']} | {r['batch']} | {r['latency_ms']:.2f} | "
                       f"{r['speedup']:.2f}× |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(RECIPES))
    parser.add_argument("--parts", default="accuracy,speed", help="accuracy, speed (speed needs accuracy's outputs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compose.json"))
    args = parser.parse_args(argv)
    if not (ROOT.parent / "shared").is_dir():
        print(f"needs the shared models and data at {ROOT.parent / 'shared'}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    results: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "accuracy": [],
                     "model_speed": [], "layer_speed": []}
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="capdist-compose-") as tmp:
        for model_name in args.models.split(","):
            if "accuracy" in parts or "speed" in parts:
                results["accuracy"] += accuracy(model_name, Path(tmp))
            if "speed" in parts:
                results["model_speed"] += model_speed(model_name, results["accuracy"])
        if "speed" in parts:
            results["layer_speed"] = layer_speed()
    for row in results["accuracy"]:
        row.pop("output", None)
    print(tables(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
