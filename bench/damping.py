"""How damping changes each method's true error, and the smallest damping that is stable for each.

    python bench/damping.py                        # the bench/peers.py layers, 50 % and 2:4
    python bench/damping.py --no-loud --cases 50%  # the real layers only

Damping is a numerical device: every method here minimises a damped objective, but is judged on the undamped one,
‖(W−Ŵ)X‖²/‖WX‖² on the calibration H (float64).  For each layer, method and damping value the bench records that
error and whether the solver had to escalate the damping (a Cholesky that failed: the run then used a larger value
than asked).  A value is *stable* when nothing escalated and the error is within STABLE_WITHIN of the method's
best on that layer (too little damping rarely fails the Cholesky outright: a float32 inverse of an
ill-conditioned H just gives a much worse answer, 10× on the loud layer).  The table marks the smallest stable
value and the best one per method, so a recipe's ``prune.damp`` and ``prune.polish_damp`` can be checked against
both.  `cap(default)` sweeps the greedy's damping with the polish at its own default (``DEFAULT_POLISH_DAMP``);
`cap(default, polish=damp)` sweeps both together.  Each method runs with the damping form of its recipe default
(``prune.damp_mode``: relative for `cap`, upstream's mean form for `sparsegpt` and `obs`).  One thread; writes
``bench/results/damping.json``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import loud_layer, real_layers  # noqa: E402
from bench.solvers import SHARED, write_json_atomic  # noqa: E402
from cap_dist.solvers import DEFAULT_CAP_ADMM, prune_layer, relative_error  # noqa: E402

DAMPS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
CASES = {"50%": (0.5, "unstructured"), "2:4": (0.5, "2:4")}
METHODS = {                                   # label -> prune_layer keywords (the recipe's damping form)
    "cap(plain)": dict(method="cap", damp_mode="relative"),
    "cap(default)": dict(method="cap", damp_mode="relative", admm=DEFAULT_CAP_ADMM, resolve=True),  # polish 1e-3
    "cap(default, polish=damp)": dict(method="cap", damp_mode="relative", admm=DEFAULT_CAP_ADMM, resolve=True),
    "sparsegpt(faithful)": dict(method="sparsegpt", damp_mode="mean"),
    "obs(faithful)": dict(method="obs", damp_mode="mean"),
}
POLISH_FOLLOWS_DAMP = {"cap(default, polish=damp)"}
RECIPE_DAMP = 0.01
STABLE_WITHIN = 1.10
SLOW_OBS_COLUMNS = 1024
"""`obs` (whole-row OBS, rows·in³) is skipped on layers wider than this: hours on the 3072-wide loud layer."""


def sweep(name: str, w: torch.Tensor, h: torch.Tensor, cases: list[str], methods: list[str]) -> list[dict]:
    rows = []
    for case in cases:
        sparsity, pattern = CASES[case]
        for label in methods:
            kw = METHODS[label]
            if kw["method"] == "obs" and w.shape[1] > SLOW_OBS_COLUMNS:
                continue
            for damp in DAMPS:
                t0 = time.process_time()
                args = dict(kw, polish_damp=damp) if label in POLISH_FOLLOWS_DAMP else kw
                try:
                    res = prune_layer(w, h, sparsity=sparsity, pattern=pattern, damp=damp, **args)
                except (RuntimeError, ValueError) as err:      # a solver that cannot run at this damping
                    rows.append(dict(layer=name, case=case, method=label, damp=damp, rel_error=math.inf,
                                     escalations=None, error=str(err).splitlines()[0]))
                    continue
                err = relative_error(w.double(), res.weight.double(), h.double())
                rows.append(dict(layer=name, case=case, method=label, damp=damp, rel_error=err,
                                 escalations=int(res.info.get("escalations", 0)),
                                 damp_used=res.info.get("damp_used"), seconds=time.process_time() - t0))
                print(f"{name:<34} {case:>4} {label:<20} damp {damp:<7g} error {err:.5g} "
                      f"escalations {rows[-1]['escalations']}", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (layer, case, method): the smallest stable damping, the best damping, and the recipe's error vs best."""
    out = []
    keys = sorted({(r["layer"], r["case"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        cell = [r for r in rows if (r["layer"], r["case"], r["method"]) == key]
        best = min(cell, key=lambda r: r["rel_error"])
        stable = [r for r in cell if r["escalations"] == 0 and r["rel_error"] <= STABLE_WITHIN * best["rel_error"]]
        recipe = next(r for r in cell if r["damp"] == RECIPE_DAMP)
        out.append(dict(layer=key[0], case=key[1], method=key[2],
                        smallest_stable=min(r["damp"] for r in stable) if stable else None,
                        best_damp=best["damp"], best_error=best["rel_error"],
                        recipe_error=recipe["rel_error"], recipe_vs_best=recipe["rel_error"] / best["rel_error"]))
    return out


def table(rows: list[dict], summary: list[dict]) -> str:
    head = "| layer | case | method | " + " | ".join(f"damp {d:g}" for d in DAMPS) + " | smallest stable | best | " \
        f"recipe ({RECIPE_DAMP:g}) vs best |"
    head = head.replace("smallest stable", f"smallest stable (≤ {STABLE_WITHIN:g}× best)")
    lines = [head, "|" + "---|" * (len(DAMPS) + 6)]
    for s in summary:
        cells = []
        for d in DAMPS:
            r = next(r for r in rows if (r["layer"], r["case"], r["method"], r["damp"]) ==
                     (s["layer"], s["case"], s["method"], d))
            mark = "" if r["escalations"] == 0 else (" (failed)" if r["escalations"] is None
                                                      else f" (escalated ×{r['escalations']})")
            cells.append(f"{r['rel_error']:.4g}{mark}")
        stable = "none" if s["smallest_stable"] is None else f"{s['smallest_stable']:g}"
        lines.append(f"| {s['layer']} | {s['case']} | {s['method']} | " + " | ".join(cells) +
                     f" | {stable} | {s['best_damp']:g} | {s['recipe_vs_best']:.3f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-real", action="store_true", help="skip the vit4mnist / EfficientNet layers")
    parser.add_argument("--no-loud", action="store_true", help="skip the synthetic 768×3072 loud layer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "damping.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers = []
    if not args.no_real:
        if not SHARED.is_dir():
            print(f"the real layers need the shared models and data at {SHARED} (or pass --no-real)")
            return 2
        layers += real_layers()
    if not args.no_loud:
        layers.append(("synthetic/loud 768×3072", *loud_layer(768, 3072)))
    start = time.perf_counter()
    rows = [r for name, w, h in layers for r in sweep(name, w, h, args.cases, args.methods)]
    summary = summarise(rows)
    text = table(rows, summary)
    print("\nrelative error on the undamped H\n" + text)
    write_json_atomic(args.out, dict(command="python bench/damping.py " + " ".join(argv or sys.argv[1:]),
                                     seconds=time.perf_counter() - start, machine=platform.platform(), threads=1,
                                     damps=list(DAMPS), results=rows, summary=summary, table=text))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
