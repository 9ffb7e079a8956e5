"""cap-dist's layer solvers side by side with upstream ALPS and SparseGPT, on the same layers and the same H.

    python bench/peers.py --peers /path/to/peers            # the issue-13 layers; writes bench/results/peers.json
    python bench/peers.py --peers DIR --big                 # also the 1536×6144 ViT-g-shaped layer (slow on CPU)
    python bench/peers.py --peers DIR --big-only --cases 50% --out bench/results/peers-big.json
    python bench/peers.py                                   # cap-dist's methods only

``--peers DIR`` holds checkouts of https://github.com/mazumder-lab/ALPS (as DIR/ALPS) and
https://github.com/IST-DASLab/sparsegpt (as DIR/sparsegpt).  Their code is not part of cap-dist; to run it on
a CPU, edit the copies in DIR (not this repository):

    sed -i "s/'cuda:0'/'cpu'/g; s/torch.cuda.synchronize()/pass/; s/torch.cuda.empty_cache()/pass/" DIR/ALPS/alps.py
    sed -i "s/torch.cuda.synchronize()/pass/; s/torch.cuda.empty_cache()/pass/" DIR/sparsegpt/sparsegpt.py

Neither needs ``transformers`` for a plain linear layer; a stand-in module is used when it is not installed.

Every method is judged on the true objective: relative error ‖(W−Ŵ)X‖²/‖WX‖² = tr(δW H δWᵀ)/tr(W H Wᵀ) on
the *undamped* H of the calibration inputs (float64), one thread.  Layers: vit4mnist blocks.2.attn.qkv,
blocks.2.mlp.fc1, blocks.2.mlp.fc2, blocks.5.mlp.fc2 (512 MNIST test images); EfficientNet-Lite0
blocks.5.1.conv_pw, blocks.5.0.conv_pwl, conv_head (128 ImageNet samples); a synthetic 768×3072 layer with
X = Z·A (A random / √3072, N = 4096) and 8 input channels ×20 (cond H ≈ 1e11).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.solvers import SHARED, write_json_atomic  # noqa: E402
from cap_dist.solvers import DEFAULT_CAP_ADMM, prune_layer, relative_error  # noqa: E402

CASES = [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")]
VIT_LAYERS = ["blocks.2.attn.qkv", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2", "blocks.5.mlp.fc2"]
EFFNET_LAYERS = ["blocks.5.1.conv_pw", "blocks.5.0.conv_pwl", "conv_head"]
OURS = {                                        # label -> prune_layer keywords (block 128 = the recipe default)
    "cap(plain)": dict(method="cap", resolve=False),
    "cap+resolve": dict(method="cap", resolve=True),
    "cap(default)": dict(method="cap", admm=DEFAULT_CAP_ADMM, resolve=True),     # = a recipe's prune.method=cap
    "cap+refine+admm+resolve": dict(method="cap", refine=1, admm=DEFAULT_CAP_ADMM, resolve=True),
    "cap(rho 0.1)": dict(method="cap", admm=DEFAULT_CAP_ADMM, resolve=True, admm_rho=0.1),     # ALPS's starting ρ
    "sparsegpt(relative damp)": dict(method="sparsegpt", damp_mode="relative"),
    "sparsegpt(faithful)": dict(method="sparsegpt", damp_mode="mean"),         # = a recipe's prune.method=sparsegpt
}


def loud_layer(rows: int, cols: int, seed: int = 0, samples: int = 4096, loud: int = 8,
               factor: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and H = 2/N XᵀX for X = Z·A (correlated inputs) with ``loud`` input channels ×``factor``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(samples, cols, generator=g) @ a
    x[:, :loud] *= factor
    h = (2.0 / samples) * (x.double().T @ x.double())
    return torch.randn(rows, cols, generator=g) / math.sqrt(cols), h.float()


def real_layers() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from cap_dist.data import load_imagenet_samples, load_mnist, preprocess_mnist, sample_indices
    from cap_dist.models import capture_layer_inputs, find_prunable_layers, flattened_weight, load_model_dir

    out = []
    model, spec = load_model_dir(str(SHARED / "models" / "vit4mnist"))
    images, _ = load_mnist(str(SHARED / "data" / "mnist"))
    layers = {n: m for n, m in find_prunable_layers(model).items() if n in VIT_LAYERS}
    accs = capture_layer_inputs(model, layers, preprocess_mnist(images[:512], spec.input).split(128))
    out += [(f"vit4mnist/{n}", flattened_weight(m).clone(), accs[n].hessian().float()) for n, m in layers.items()]
    model, spec = load_model_dir(str(SHARED / "models" / "tf_efficientnet_lite0"))
    batch = load_imagenet_samples(str(SHARED / "data" / "imagenet-samples"), spec.input,
                                  sample_indices(1000, 128, seed=0)).images
    layers = {n: m for n, m in find_prunable_layers(model).items() if n in EFFNET_LAYERS}
    accs = capture_layer_inputs(model, layers, batch.split(32))
    out += [(f"effnet_lite0/{n}", flattened_weight(m).clone(), accs[n].hessian().float()) for n, m in layers.items()]
    return out


class Peers:
    """Upstream fasterprune (SparseGPT) and ALPS_admm on a bare linear layer holding W, fed our H."""

    def __init__(self, folder: Path) -> None:
        if "transformers" not in sys.modules:
            try:
                import transformers  # noqa: F401
            except ImportError:                       # both only test isinstance(layer, transformers.Conv1D)
                sys.modules["transformers"] = types.SimpleNamespace(Conv1D=type("Conv1D", (), {}))
        for name in ("sparsegpt", "ALPS"):
            if not (folder / name).is_dir():
                raise SystemExit(f"--peers {folder}: no {name}/ checkout there (see this file's docstring)")
            sys.path.insert(0, str(folder / name))
        import alps
        import sparsegpt
        self.sparsegpt, self.alps = sparsegpt, alps

    @staticmethod
    def _linear(w: torch.Tensor) -> torch.nn.Linear:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.float().clone()
        return layer

    def run(self, name: str, w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
        n_m = [int(v) for v in pattern.split(":")] if pattern != "unstructured" else [0, 0]
        layer = self._linear(w)
        with contextlib.redirect_stdout(io.StringIO()):
            if name == "sparsegpt(upstream)":
                pruner = self.sparsegpt.SparseGPT(layer)
                pruner.H = h.float().clone()
                pruner.fasterprune(sparsity, prunen=n_m[1] - n_m[0] if n_m[1] else 0, prunem=n_m[1], blocksize=128,
                                   percdamp=0.01)
            else:
                pruner = self.alps.ALPS_prune(layer, 1, 1)
                pruner.XtX = h.float().clone()
                pruner.ALPS_admm(sparsity, nm_n=n_m[0], nm_m=n_m[1])
        return layer.weight.data.clone()


def run_layer(name: str, w: torch.Tensor, h: torch.Tensor, cases, peers: Peers | None, results: list,
              ours: list[str]) -> None:
    h64 = h.double()
    for sparsity, pattern in cases:
        case = pattern if pattern != "unstructured" else f"{round(sparsity * 100)}%"
        runs = ours + (["sparsegpt(upstream)", "alps(upstream)"] if peers else [])
        for label in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            if label in OURS:
                res = prune_layer(w, h, sparsity=sparsity, pattern=pattern, **OURS[label])
                pruned = res.weight
            else:
                pruned = peers.run(label, w, h, sparsity, pattern)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            err = relative_error(w, pruned, h64)
            achieved = float((pruned == 0).float().mean())
            results.append(dict(layer=name, shape=list(w.shape), case=case, method=label, rel_error=err,
                                seconds=seconds, cpu_seconds=cpu, sparsity=achieved))
            print(f"  {name:<34} {case:>4} {label:<22} err {err:.5f}  sparsity {achieved:.4f}  {seconds:7.2f}s "
                  f"wall {cpu:7.2f}s cpu", flush=True)


def table(results: list[dict], clock: str = "cpu_seconds") -> str:
    """Markdown table; times are ``clock`` (``cpu_seconds``: the process's CPU time, which a machine shared with
    other jobs inflates far less than wall time; ``seconds``: wall)."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    ref = next((m for m in ("alps(upstream)", "sparsegpt(faithful)") if m in methods), methods[0])
    clock = clock if all(clock in r for r in results) else "seconds"
    unit = "CPU seconds" if clock == "cpu_seconds" else "wall seconds"
    lines = [f"relative error on the undamped H (ratio to {ref}); {unit}", "",
             "| layer | case | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["layer"], r["case"]) for r in results):
        cell = {r["method"]: r for r in results if (r["layer"], r["case"]) == key}
        base = cell[ref]["rel_error"]
        row = [f"{cell[m]['rel_error']:.4g} ({cell[m]['rel_error'] / base:.2f}×) {cell[m][clock]:.1f}s"
               if m in cell else "—" for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
    lines += ["", f"| geometric mean ratio to {ref} | | " + " | ".join(
        f"{math.exp(sum(math.log(r['rel_error'] / next(q['rel_error'] for q in results if q['layer'] == r['layer'] and q['case'] == r['case'] and q['method'] == ref)) for r in results if r['method'] == m) / max(1, sum(r['method'] == m for r in results))):.3f}"
        for m in methods) + " |"]
    total = {m: sum(r[clock] for r in results if r["method"] == m) for m in methods}
    lines.append(f"| total {unit} | | " + " | ".join(f"{total[m]:.0f}" for m in methods) + " |")
    for peer in ("alps(upstream)", "sparsegpt(upstream)"):
        if peer in total:
            lines.append(f"| time ratio to {peer} | | " + " | ".join(f"{total[m] / total[peer]:.2f}×"
                                                                      for m in methods) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=None, help="folder with ALPS/ and sparsegpt/ checkouts")
    parser.add_argument("--big", action="store_true", help="also the 1536×6144 layer")
    parser.add_argument("--no-real", action="store_true", help="skip the vit4mnist / EfficientNet layers")
    parser.add_argument("--big-only", action="store_true", help="only the 1536×6144 layer")
    parser.add_argument("--ours", default=",".join(OURS), help="comma-separated subset of " + ", ".join(OURS))
    parser.add_argument("--cases", default="50%,70%,2:4", help="comma-separated subset of 50%%,70%%,2:4")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = set(args.cases.split(","))
    cases = [c for c in CASES if (c[1] if c[1] != "unstructured" else f"{round(c[0] * 100)}%") in wanted]
    peers = Peers(args.peers) if args.peers else None
    prune_layer(torch.randn(4, 64), torch.eye(64), method="cap", sparsity=0.5, block_size=32)  # compile numba
    layers = [] if args.no_real or args.big_only else real_layers()
    if not args.big_only:
        layers.append(("synthetic/loud 768×3072", *loud_layer(768, 3072)))
    if args.big or args.big_only:
        layers.append(("synthetic/loud 1536×6144", *loud_layer(1536, 6144, seed=1)))
    results: list[dict] = []
    start = time.perf_counter()
    for name, w, h in layers:
        run_layer(name, w, h, cases, peers, results, [m for m in args.ours.split(",") if m])
    text = table(results)
    print("\n" + text)
    write_json_atomic(args.out, dict(command=" ".join(["python", "bench/peers.py"] + (argv or sys.argv[1:])),
                                     seconds=time.perf_counter() - start, threads=torch.get_num_threads(),
                                     torch=torch.__version__, machine=platform.platform(), cpus=os.cpu_count(),
                                     results=results, table=text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
