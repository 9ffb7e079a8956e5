"""Memory of the processes that used to hold the whole model: the Ray driver (it gathered every actor's pruned
state to write one file; now actors write shards) and each finetune worker (it loaded the full student and
teacher before sharding; now each reads its FSDP2 rows).

    nice python bench/output_memory.py driver                 # ViT-g/14 shape, 2 actors, magnitude, 1 image
    nice python bench/output_memory.py finetune               # ViT-L/14 shape, 1 vs 2 workers (+ rank-0 broadcast)

Weights are random and written tensor by tensor (no process of this script holds the dense model either); the
solver is irrelevant to the driver's memory, so the prune uses magnitude on a few images. Results go to
bench/results/output_memory-<what>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def random_model_folder(folder: Path, arch: str, kwargs: dict, size: int) -> str:
    """A model folder whose safetensors file is written one tensor at a time from the meta skeleton (random
    normal · 0.02, ones for norm weights): peak memory one tensor, whatever the model."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    state = model.state_dict()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, value in state.items():
        nbytes = value.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, value in state.items():
            if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or "ls1" in key or "ls2" in key:
                tensor = torch.ones(value.shape)
            else:
                tensor = torch.randn(value.shape, generator=generator) * 0.02
            f.write(tensor.numpy().tobytes())
    spec = {"size": size, "resize_short_side": size, "center_crop": size, "interpolation": "bilinear",
            "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "model.json").write_text(json.dumps({"architecture": f"timm:{arch}", "create_kwargs": kwargs,
                                                   "input": spec}))
    return str(folder)


def random_images(folder: Path, n: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
    return str(folder)


class PeakSampler:
    """This process's resident memory sampled every 10 ms; ``peak_mb`` since start, ``baseline_mb`` at start."""

    def __init__(self) -> None:
        from cap_dist.engines.distributed.memory import current_rss_mb

        self._rss = current_rss_mb
        self.baseline_mb = self.peak_mb = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def measure_driver(work: Path, images: int, actors: int) -> dict:
    from scaling import start_local_ray

    from cap_dist.config import recipe_from_dict
    from cap_dist.engines import prune
    from cap_dist.engines.distributed.memory import current_rss_mb, peak_rss_mb

    model_dir = random_model_folder(work / "model", "vit_giant_patch14_dinov2", {"img_size": 224}, 224)
    data = random_images(work / "images", images, 224)
    start_local_ray(actors)
    import ray  # noqa: F401 (Ray's own memory belongs to the baseline)

    recipe = recipe_from_dict({
        "model": {"source": model_dir}, "calibration": {"uri": data, "samples": images, "batch_size": images},
        "prune": {"method": "magnitude", "sparsity": 0.5, "mode": "independent", "float64_hessians": False},
        "output": str(work / "out"), "device": "cpu", "distributed": {"actors": actors, "num_cpus": 1}})
    baseline = current_rss_mb()
    sampler = PeakSampler()
    start = time.perf_counter()
    result = prune(recipe)
    peak = sampler.stop()
    index = json.loads((work / "out" / "model.safetensors.index.json").read_text())
    return {"arch": "vit_giant_patch14_dinov2", "images": images, "actors": actors,
            "wall_seconds": time.perf_counter() - start, "driver_baseline_mb": baseline,
            "driver_peak_during_prune_mb": peak, "driver_ru_maxrss_mb": peak_rss_mb(),
            "model_bytes": index["metadata"]["total_size"],
            "shards": sorted(n for n in result.manifest["files"] if n.startswith("model-")),
            "actors_stats": [{k: s[k] for k in ("index", "peak_rss_mb", "baseline_rss_mb", "stage_peak_rss_mb")}
                             for s in result.manifest["actors"]], "timings": result.timings}


def measure_finetune(work: Path, runs: list[tuple[int, str]]) -> dict:
    from scaling import start_local_ray

    from cap_dist.config import recipe_from_dict
    from cap_dist.data.parquet import write_image_parquet
    from cap_dist.engines import prune
    from cap_dist.finetune.trainer import finetune
    from cap_dist.output import read_manifest

    model_dir = random_model_folder(work / "model", "vit_large_patch14_dinov2", {"img_size": 112}, 112)
    data = random_images(work / "images", 4, 112)
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    pngs = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((112, 112, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    write_image_parquet(str(work / "train.parquet"), pngs, [0] * len(pngs))
    tree = {"model": {"source": model_dir}, "calibration": {"uri": data, "samples": 2, "batch_size": 2},
            "prune": {"method": "magnitude", "sparsity": 0.5, "mode": "sequential", "true_sequential": False,
                      "float64_hessians": False},
            "output": str(work / "pruned"), "device": "cpu", "distributed": {"actors": 2, "num_cpus": 1},
            "finetune": {"data": {"uri": str(work / "train.parquet"), "batch_size": 2, "augment": "none"},
                         "max_steps": 1, "distill": {"weight": 1.0}, "workers": 1, "evaluation_every": 0}}
    start_local_ray(2)
    prune(recipe_from_dict(dict(tree, finetune=None)))
    rows = []
    for workers, load in runs:
        recipe = recipe_from_dict(dict(tree, finetune=dict(tree["finetune"], workers=workers,
                                                             storage_path=str(work / f"train-{workers}-{load}"))))
        out = str(work / f"tuned-{workers}-{load}")
        start = time.perf_counter()
        finetune(recipe, str(work / "pruned"), out, load=load)
        memory = read_manifest(out)["finetune"]["memory"]
        for m in memory:
            m["data_above_baseline_mb"] = m["peak_rss_mb"] - m["baseline_rss_mb"]
        rows.append({"workers": workers, "load": load, "seconds": time.perf_counter() - start, "memory": memory})
        print(json.dumps(rows[-1]), flush=True)
    one = next(r for r in rows if r["workers"] == 1)["memory"][0]["data_above_baseline_mb"]
    for row in rows:
        row["worst_worker_vs_one_worker"] = max(m["data_above_baseline_mb"] for m in row["memory"]) / one
    return {"arch": "vit_large_patch14_dinov2", "img_size": 112, "batch": 2, "steps": 1, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["driver", "finetune"])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix=f"capdist-mem-{args.what}-"))
    if args.what == "driver":
        result = measure_driver(work, args.images, args.actors)
    else:
        result = measure_finetune(work, [(1, "sharded"), (2, "sharded"), (2, "rank0")])
    result["command"] = "python bench/output_memory.py " + " ".join(argv or sys.argv[1:])
    out = args.out or ROOT / "bench" / "results" / f"output_memory-{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {out} (work folder {work}: remove it when done)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
