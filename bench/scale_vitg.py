"""Scale: a DINOv2 ViT-g/14-shaped model (1.1 B parameters, random weights) pruned to 50 % with `cap` by 2
actors on one 24 GiB, 2-core machine.

    python bench/scale_vitg.py --block-size 128 --polish off --pipeline-images 2    # ~9 min on 2 cores
    python bench/scale_vitg.py --block-size 512                                      # 71 min (256: 27)

Reports wall time, time per stage (load, calibrate, solve, write) and each actor's peak memory, and writes
bench/results/scale_vitg-b<block size>.json.  Weights are random (no hub access here): the run measures the engine, not
accuracy.  The model folder is made in a child process so the driver never holds the dense model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaling import make_assets, run, start_local_ray  # noqa: E402

ARCH = "vit_giant_patch14_dinov2"


def gib_by_stage(stats: dict) -> str:
    peaks = stats.get("stage_peak_rss_mb", {})
    return " / ".join(f"{peaks[k] / 1024:.1f}" if k in peaks else "–" for k in ("load", "calibrate", "solve"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="images per calibration batch")
    parser.add_argument("--pipeline-images", type=int, default=None,
                        help="distributed.pipeline_images: images per step of the calibration stream through the "
                             "actors (default: whole batches); the chain idles one step at each end, so batches of 8 "
                             "idle 1/5 of the calibration, steps of 2 1/17 (measured: 210 s against 198 s)")
    parser.add_argument("--polish", choices=("default", "off"), default="default",
                        help="off: the greedy alone (no ADMM mask refinement, no exact re-solve), the configuration "
                             "of the first B=128 figure")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default bench/results/scale_vitg-b<block size>.json)")
    args = parser.parse_args(argv)
    suffix = "" if args.polish == "default" else "-greedy"
    args.out = args.out or ROOT / "bench" / "results" / f"scale_vitg-b{args.block_size}{suffix}.json"
    work = Path(tempfile.mkdtemp(prefix="capdist-vitg-"))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        model_dir, images = pool.apply(make_assets, (work, ARCH, {"img_size": 224}, args.images, 224))
    assets_seconds = time.perf_counter() - start
    start_local_ray(args.actors)
    row = run(model_dir, images, args.images, args.actors, str(work / "out"), args.block_size,
              polish=args.polish == "default", batch_size=args.batch_size, pipeline_images=args.pipeline_images)
    t = row["timings"]
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {t[k]:.0f} |" for k in ("load", "calibrate", "solve", "write", "total") if k in t]
    lines += ["", "| actor | peak RSS (GiB) | runtime baseline (GiB) | peak by stage: load / calibrate / solve (GiB) | "
              "load s | calibrate s | solve s | layers |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['index']} | {s['peak_rss_mb'] / 1024:.1f} | {s['baseline_rss_mb'] / 1024:.1f} | "
              f"{gib_by_stage(s)} | {s['load_seconds']:.0f} | {s['calibrate_seconds']:.0f} | "
              f"{s['solve_seconds']:.0f} | {s['layers']} |" for s in row["actor_stats"]]
    table = "\n".join(lines)
    print(f"\n{ARCH}, {args.images} images at 224 px, cap 50 %, block size {args.block_size}, {args.actors} actors "
          f"× 1 CPU, polish {args.polish}; wall {row['wall_seconds']:.0f} s (+{assets_seconds:.0f} s to make the random model)\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/scale_vitg.py " + " ".join(argv or sys.argv[1:]),
                                    "arch": ARCH, "block_size": args.block_size, "polish": args.polish, "images": args.images,
                                    "batch_size": args.batch_size, "pipeline_images": args.pipeline_images,
                                    "assets_seconds": assets_seconds, **row, "table": table}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
