"""Layer solvers side by side: relative reconstruction error and wall time of every method on real
layers and on ViT-shaped layers with correlated inputs.

    python bench/solvers.py                      # full run (~20 min on 2 cores), writes bench/results/solvers.json
    python bench/solvers.py --preset quick       # a few minutes: fewer shapes and cases
    python bench/solvers.py --preset demo        # about a minute, what `make demo` shows

Real layers: every prunable layer of ``../shared/models/vit4mnist`` (inputs: 512 MNIST test images) and
of ``../shared/models/tf_efficientnet_lite0`` (inputs: 128 ImageNet samples), captured as H = 2/N Σ x xᵀ.
Error is ½·tr(δW H δWᵀ) / ½·tr(W H Wᵀ) = ‖(W−Ŵ)X‖² / ‖WX‖² on the calibration inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cap_dist.solvers import DEFAULT_CAP_BLOCK, prune_layer  # noqa: E402

SHARED = ROOT.parent / "shared"
CASES = [(0.5, "unstructured"), (0.75, "unstructured"), (0.9, "unstructured"), (0.5, "2:4")]
VIT_SHAPES = [(384, 1536), (1536, 384), (1024, 4096), (4096, 1024), (1536, 6144), (1536, 4096)]
PRESETS = {
    "full": dict(shapes=VIT_SHAPES, cases=CASES, blocks=[64, 128, 256, None], real=True, rows_budget=2.0e12),
    "quick": dict(shapes=[(384, 1536), (1536, 6144)], cases=CASES[:2], blocks=[64, 128, None], real=True,
                  rows_budget=3e11),
    "demo": dict(shapes=[(384, 1536)], cases=CASES[:2], blocks=[128], real=True, rows_budget=0, real_limit=6),
}


def label(method: str, block: int | None) -> str:
    return method if method != "cap" else f"cap@{'rows' if block is None else block}"


def correlated_hessian(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and an input Hessian from AR(1)-correlated inputs (ρ=0.7) with log-normal feature scales."""
    g = torch.Generator().manual_seed(seed)
    n = max(2 * cols, 2048)
    z = torch.randn(n, cols, generator=g)
    x = torch.empty_like(z)
    x[:, 0] = z[:, 0]
    rho = 0.7
    for j in range(1, cols):                                   # AR(1) along the feature axis
        x[:, j] = rho * x[:, j - 1] + math.sqrt(1 - rho * rho) * z[:, j]
    x *= torch.exp(0.5 * torch.randn(cols, generator=g))
    h = (2.0 / n) * (x.T @ x)
    w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    return w, h


def real_layers(limit: int | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, weight [out, in], H) for the prunable layers of the two shared models."""
    from cap_dist.data import load_imagenet_samples, load_mnist, preprocess_mnist, sample_indices
    from cap_dist.models import capture_layer_inputs, find_prunable_layers, flattened_weight, load_model_dir

    out = []
    model, spec = load_model_dir(str(SHARED / "models" / "vit4mnist"))
    images, _ = load_mnist(str(SHARED / "data" / "mnist"))
    x = preprocess_mnist(images[:512], spec.input)
    layers = find_prunable_layers(model)
    accs = capture_layer_inputs(model, layers, x.split(128))
    out += [(f"vit4mnist/{n}", flattened_weight(m).clone(), accs[n].hessian().float()) for n, m in layers.items()]
    model, spec = load_model_dir(str(SHARED / "models" / "tf_efficientnet_lite0"))
    idx = sample_indices(1000, 128, seed=0)
    batch = load_imagenet_samples(str(SHARED / "data" / "imagenet-samples"), spec.input, idx).images
    layers = find_prunable_layers(model)
    accs = capture_layer_inputs(model, layers, batch.split(32))
    out += [(f"effnet_lite0/{n}", flattened_weight(m).clone(), accs[n].hessian().float())
            for n, m in layers.items()]
    return out[:limit] if limit else out


def run_layer(group: str, name: str, w: torch.Tensor, h: torch.Tensor, cases, blocks, rows_budget: float,
              results: list[dict]) -> None:
    rows, cols = w.shape
    for sparsity, pattern in cases:
        runs = [("magnitude", None), ("wanda", None), ("obs", None), ("sparsegpt", 128)]
        # a block at least as wide as the layer is whole rows (the exact OBC greedy)
        runs += [("cap", b) for b in blocks if b is not None or rows * cols ** 3 <= rows_budget]
        for method, block in runs:
            res = prune_layer(w, h, method=method, sparsity=sparsity, pattern=pattern, block_size=block)
            results.append(dict(group=group, layer=name, shape=[rows, cols], case=case_name(sparsity, pattern),
                                method=label(method, block), rel_error=res.relative_error,
                                seconds=res.info["seconds"], sparsity=res.sparsity))
            print(f"  {name:<38} {case_name(sparsity, pattern):>5} {label(method, block):<10} "
                  f"err {res.relative_error:.4f}  {res.info['seconds']:7.2f}s", flush=True)


def case_name(sparsity: float, pattern: str) -> str:
    return pattern if pattern != "unstructured" else f"{round(sparsity * 100)}%"


def table(results: list[dict]) -> str:
    """Markdown tables: synthetic shapes per row; real layers summarised per model."""
    lines = []
    methods = sorted({r["method"] for r in results}, key=lambda m: (m.startswith("cap"), m))
    synth = [r for r in results if r["group"] == "vit-shape"]
    if synth:
        lines += ["### ViT-shaped layers, correlated inputs: relative error (time ratio vs sparsegpt)", "",
                  "| layer [out×in] | case | " + " | ".join(methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for key in dict.fromkeys((r["layer"], r["case"]) for r in synth):
            cell = {r["method"]: r for r in synth if (r["layer"], r["case"]) == key}
            base = cell["sparsegpt"]["seconds"]
            row = [f"{cell[m]['rel_error']:.4f} ({cell[m]['seconds'] / base:.2f}×)" if m in cell else "—"
                   for m in methods]
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
        lines.append("")
    real = [r for r in results if r["group"] != "vit-shape"]
    if real:
        lines += ["### Real layers: mean relative error over the model's layers; "
                  f"'best' = layers where cap@{DEFAULT_CAP_BLOCK} has the lowest error of all methods", "",
                  "| model | case | layers | " + " | ".join(methods) + f" | cap@{DEFAULT_CAP_BLOCK} best |",
                  "|---|---|---|" + "---|" * (len(methods) + 1)]
        for key in dict.fromkeys((r["group"], r["case"]) for r in real):
            rows = [r for r in real if (r["group"], r["case"]) == key]
            layers = list(dict.fromkeys(r["layer"] for r in rows))
            means = []
            for m in methods:
                vals = [r["rel_error"] for r in rows if r["method"] == m]
                means.append(f"{sum(vals) / len(vals):.4f}" if len(vals) == len(layers) else
                             (f"{sum(vals) / len(vals):.4f}*" if vals else "—"))
            best = 0
            for layer in layers:
                errs = {r["method"]: r["rel_error"] for r in rows if r["layer"] == layer}
                default = errs.get(f"cap@{DEFAULT_CAP_BLOCK}", errs.get("cap@rows"))
                others = [e for m, e in errs.items() if not m.startswith("cap")]
                best += default is not None and default <= min(others)
            lines.append(f"| {key[0]} | {key[1]} | {len(layers)} | " + " | ".join(means) + f" | {best}/{len(layers)} |")
        lines += ["", "(* = mean over the layers where that variant ran: whole rows run only where "
                  "rows·in³ fits the preset's budget; a block wider than the layer is whole rows)"]
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/solvers-PRESET.json)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.out or ROOT / "bench" / "results" / f"solvers-{args.preset}.json"
    results: list[dict] = []
    start = time.perf_counter()
    prune_layer(torch.randn(4, 64), torch.eye(64), method="cap", sparsity=0.5, block_size=32)  # compile numba once
    if preset["real"]:
        if SHARED.exists():
            print(f"capturing real layer inputs from {SHARED}/models ...", flush=True)
            for name, w, h in real_layers(preset.get("real_limit")):
                run_layer(name.split("/")[0], name, w, h, preset["cases"],
                          [b for b in preset["blocks"]] + ([None] if None not in preset["blocks"] else []),
                          max(preset["rows_budget"], 5e10), results)
        else:
            print(f"no {SHARED}: real layers skipped (they need the shared models and images)", flush=True)
    for rows, cols in preset["shapes"]:
        w, h = correlated_hessian(rows, cols, seed=rows * 7 + cols)
        run_layer("vit-shape", f"{rows}×{cols}", w, h, preset["cases"], preset["blocks"], preset["rows_budget"],
                  results)
    elapsed = time.perf_counter() - start
    text = table(results)
    print("\n" + text)
    payload = dict(command=" ".join(["python", "bench/solvers.py"] + (argv if argv is not None else sys.argv[1:])),
                   preset=args.preset, seconds=elapsed, torch=torch.__version__, threads=torch.get_num_threads(),
                   machine=platform.platform(), cpus=os.cpu_count(), results=results, table=text)
    write_json_atomic(out, payload)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
