"""cap's steps one at a time, from measurements already made (no solving here):

    python bench/ablation.py        # reads bench/results/peers.json and oneshot*.json, writes ablation.json

Layer level (bench/peers.py): relative error on the undamped H as the geometric mean of the ratio to upstream
ALPS over every layer and case, the number of cells at or below ALPS, and total seconds on one thread.
Model level (bench/oneshot.py --ablation): top-1 of the sequential prune with the steps switched on in turn,
the last being cap's recipe default (with BatchNorm re-estimation).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.solvers import write_json_atomic  # noqa: E402

LAYER_STEPS = [("cap(plain)", "cap"), ("cap+resolve", "+ resolve"), ("cap(default)", "+ admm (recipe default)"),
               ("cap+refine+admm+resolve", "+ refine")]
MODEL_STEPS = [("cap(plain, BN kept)", "cap"), ("cap+resolve (BN kept)", "+ resolve"),
               ("cap+admm+resolve (BN kept)", "+ admm"), ("cap", "+ BN re-estimation (recipe default)")]


def layer_table(results: list[dict]) -> tuple[str, list[dict]]:
    ref = {(r["layer"], r["case"]): r["rel_error"] for r in results if r["method"] == "alps(upstream)"}
    clock = "cpu_seconds" if all("cpu_seconds" in r for r in results) else "seconds"   # CPU time: see peers.py
    alps_seconds = sum(r[clock] for r in results if r["method"] == "alps(upstream)")
    rows = []
    for method, label in LAYER_STEPS:
        mine = [r for r in results if r["method"] == method and (r["layer"], r["case"]) in ref]
        if not mine:
            continue
        ratios = [r["rel_error"] / ref[(r["layer"], r["case"])] for r in mine]
        seconds = sum(r[clock] for r in mine)
        rows.append(dict(step=label, method=method, cells=len(mine), geo_mean_vs_alps=math.exp(
            sum(map(math.log, ratios)) / len(ratios)), worst_vs_alps=max(ratios),
            at_or_below_alps=sum(x <= 1.0 for x in ratios), seconds=seconds, time_vs_alps=seconds / alps_seconds))
    lines = ["| step | error vs ALPS (geo-mean) | worst cell | cells ≤ ALPS | seconds (vs ALPS) |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['geo_mean_vs_alps']:.3f}× | {r['worst_vs_alps']:.3f}× | {r['at_or_below_alps']}/"
              f"{r['cells']} | {r['seconds']:.0f} s ({r['time_vs_alps']:.2f}×) |" for r in rows]
    return "\n".join(lines), rows


def model_table(results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for r in results:
        for method, label in MODEL_STEPS:
            if r["method"] == method and r["mode"] == "sequential":
                rows.append(dict(model=r["model"], case=r["case"], step=label, top1=r["top1"],
                                 agreement=r.get("agreement"), seconds=r["seconds"]))
    keys = list(dict.fromkeys((r["model"], r["case"]) for r in rows))
    lines = ["| model | case | " + " | ".join(label for _, label in MODEL_STEPS) + " |",
             "|---|---|" + "---|" * len(MODEL_STEPS)]
    for model, case in keys:
        cell = {r["step"]: r for r in rows if (r["model"], r["case"]) == (model, case)}
        lines.append(f"| {model} | {case} | " + " | ".join(
            f"{cell[label]['top1']:.4f}" if label in cell else "—" for _, label in MODEL_STEPS) + " |")
    return "\n".join(lines), rows


def main() -> int:
    results = ROOT / "bench" / "results"
    peers = json.loads((results / "peers.json").read_text())
    text_l, rows_l = layer_table(peers["results"])
    oneshot = []
    for path in sorted(results.glob("oneshot*.json")):
        oneshot += json.loads(path.read_text())["results"]
    text_m, rows_m = model_table(oneshot)
    print(text_l + "\n\n" + text_m)
    write_json_atomic(results / "ablation.json", dict(command="python bench/ablation.py",
                                                      sources=["peers.json", "oneshot*.json"], layers=rows_l,
                                                      models=rows_m, table_layers=text_l, table_models=text_m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
