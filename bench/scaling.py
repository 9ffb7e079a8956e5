"""Strong scaling of the Ray engine: the same prune with 1 and 2 actors (1 CPU each), side by side.

    python bench/scaling.py                 # ViT-B/16 shape, random init, 64 images at 224 px, cap 50 %, ~10 min

Reports wall time (and its ratio), time per stage, and each actor's peak memory (RSS) against the single
actor's, in total, above the runtime's own baseline (torch, numba, Ray: measured in the actor before it loads
anything), and per stage.  Uses a local Ray started here with 2 CPUs, on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCAL_ONLY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
              "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
              "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1"}


def start_local_ray(cpus: int) -> None:
    import ray

    os.environ.update(LOCAL_ONLY)
    home = tempfile.mkdtemp(prefix="rayhome")
    Path(home, "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ["HOME"] = home
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
             _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)


def make_assets(root: Path, arch: str, kwargs: dict, images: int, size: int) -> tuple[str, str]:
    """A random-init model folder and a folder of random images (the benchmark measures time and memory)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    folder = root / "model"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    spec = {"size": size, "resize_short_side": size, "center_crop": size, "interpolation": "bilinear",
            "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "model.json").write_text(json.dumps({"architecture": f"timm:{arch}", "create_kwargs": kwargs,
                                                   "input": spec}))
    del model
    rng = np.random.default_rng(0)
    data = root / "images" / "c0"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
    return str(folder), str(root / "images")


def run(model_dir: str, images: str, n_images: int, actors: int, out: str, block_size: int,
        polish: bool = True, batch_size: int = 8, pipeline_images: int | None = None) -> dict:
    """Prune with `cap` at 50 %; ``polish=False`` turns off the ADMM mask refinement and the exact re-solve that
    follow the greedy by default (the greedy alone, as before they became the default). ``batch_size``: images
    per calibration batch; ``pipeline_images``: images per step of the calibration stream through the actors
    (``distributed.pipeline_images``; None: whole calibration batches, the engine's default)."""
    from cap_dist.config import recipe_from_dict
    from cap_dist.engines import prune

    extra = {} if polish else {"admm_iterations": 0, "resolve": False}
    recipe = recipe_from_dict({
        "model": {"source": model_dir}, "calibration": {"uri": images, "samples": n_images, "batch_size": batch_size},
        "prune": {"method": "cap", "sparsity": 0.5, "block_size": block_size, "mode": "independent", **extra},
        "output": out, "device": "cpu", "distributed": {"actors": actors, "num_cpus": 1, "pipeline_images": pipeline_images}})
    start = time.perf_counter()
    result = prune(recipe)
    return {"actors": actors, "wall_seconds": time.perf_counter() - start, "timings": result.timings,
            "actor_stats": result.manifest["actors"],
            "layer_seconds": {r.layer: r.seconds for r in result.layers}}   # the solver's own time per layer


def by_stage(stats: dict) -> str:
    """An actor's peak resident memory while loading, calibrating and solving (MiB)."""
    peaks = stats.get("stage_peak_rss_mb", {})
    return " / ".join(f"{peaks[k]:.0f}" if k in peaks else "–" for k in ("load", "calibrate", "solve"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    args = parser.parse_args(argv)
    start_local_ray(2)
    work = Path(tempfile.mkdtemp(prefix="capdist-scaling-"))
    model_dir, images = make_assets(work, args.arch, {}, args.images, 224)
    rows = [run(model_dir, images, args.images, n, str(work / f"out{n}"), args.block_size) for n in (1, 2)]
    one, two = rows
    single = one["actor_stats"][0]
    single_peak = single["peak_rss_mb"]
    single_work = single_peak - single["baseline_rss_mb"]
    lines = ["| actors | wall time | speed-up | calibrate | solve | peak RSS per actor (MiB) | vs 1 actor | "
             "above runtime baseline (MiB) | vs 1 actor | peak RSS by stage: load / calibrate / solve (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peaks = [s["peak_rss_mb"] for s in r["actor_stats"]]
        work = [s["peak_rss_mb"] - s["baseline_rss_mb"] for s in r["actor_stats"]]
        lines.append(f"| {r['actors']} | {r['wall_seconds']:.0f} s | {one['wall_seconds'] / r['wall_seconds']:.2f}× | "
                     f"{r['timings']['calibrate']:.0f} s | {r['timings']['solve']:.0f} s | "
                     f"{', '.join(f'{p:.0f}' for p in peaks)} | "
                     f"{', '.join(f'{p / single_peak:.0%}' for p in peaks)} | "
                     f"{', '.join(f'{w:.0f}' for w in work)} | {', '.join(f'{w / single_work:.0%}' for w in work)} | "
                     f"{'; '.join(by_stage(s) for s in r['actor_stats'])} |")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/scaling.py " + " ".join(argv or sys.argv[1:]),
                                    "arch": args.arch, "images": args.images, "rows": rows, "table": table},
                                   indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
