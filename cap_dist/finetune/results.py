"""What a finetune run leaves behind: the sparse model in the format of a sharded pruning output (each rank
writes its shard, rank 0 the index, ``report.parquet`` and ``sparsity.json`` last, so
:func:`cap_dist.output.load_sparse` reads it and checks every shard's sha256), plus ``metrics.parquet`` (one row per
epoch) and ``curves.png`` (losses and evaluation over the optimizer steps), both listed in the manifest.

The masks are checked on every rank's shards before anything is written (:func:`cap_dist.finetune.loop`): a
finetuned model whose pruned weights moved is not a sparse model, and is refused with
:class:`~cap_dist.finetune.masks.MaskViolationError`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from cap_dist.config import Recipe
from cap_dist.shards import WrittenFile
from cap_dist.storage import atomic_write_bytes

METRICS = "metrics.parquet"
CURVES = "curves.png"


def metrics_table_bytes(history: Sequence[Mapping[str, Any]]) -> bytes:
    """The per-epoch metrics rows as Parquet bytes (columns: every key of any row)."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    columns = {k: [row.get(k) for row in history] for k in keys}
    sink = io.BytesIO()
    pq.write_table(pa.table(columns) if keys else pa.table({"epoch": pa.array([], pa.int64())}), sink)
    return sink.getvalue()


def curves_png_bytes(history: Sequence[Mapping[str, Any]], title: str = "finetune") -> bytes:
    """A PNG: training losses per epoch (left) and the evaluation metric (right), against optimizer steps.

    Drawn on matplotlib's Agg canvas directly (no display, pyplot's backend untouched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    losses, evals = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    steps = [row["step"] for row in history]
    for key, label in (("train_loss", "loss"), ("distill_loss", "distillation"), ("label_loss", "cross-entropy")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            losses.plot(steps, [float("nan") if v is None else v for v in values], marker="o", label=label)
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("training loss (epoch mean)")
    losses.legend(loc="best")
    drawn = False
    for key, label in (("eval_top1", "top-1"), ("eval_agreement", "agreement with dense"),
                       ("eval_cosine", "cosine to dense")):
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if points:
            evals.plot(*zip(*points), marker="o", label=label)
            drawn = True
    evals.set_xlabel("optimizer step")
    evals.set_ylabel("evaluation")
    if drawn:
        evals.set_ylim(0.0, 1.0)
        evals.legend(loc="best")
    else:
        evals.text(0.5, 0.5, "no evaluation data", ha="center", va="center", transform=evals.transAxes)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def layer_rows(student_rows: Sequence[Mapping[str, Any]],
               zeros: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """The pruning report's rows with the sparsity measured on the trained weights (the pruning statistics —
    loss, error, time — stay those of the pruning step); masked tensors without a row get a minimal one.

    ``zeros``: ``{param name: (zero count, numel)}`` of the trained weights (summed over the ranks' shards)."""
    rows = []
    seen = set()
    for row in student_rows:
        row = dict(row)
        key = f"{row['layer']}.weight"
        if key in zeros:
            count, numel = zeros[key]
            row["sparsity"] = count / numel if numel else 0.0
        rows.append(row)
        seen.add(key)
    for key, (count, numel) in zeros.items():
        if key not in seen:
            rows.append({"layer": key.removesuffix(".weight"), "numel": int(numel),
                         "sparsity": count / numel if numel else 0.0})
    return rows


def write_finetuned(recipe: Recipe, output_uri: str, shards: Sequence[WrittenFile],
                    zeros: Mapping[str, tuple[int, int]], student_manifest: Mapping[str, Any],
                    history: Sequence[Mapping[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Write metrics, curves, the shards' index, report and (last) the manifest; returns the manifest.

    Args:
        recipe: the recipe of the run (its ``output`` is replaced by ``output_uri``).
        shards: the weight shards the workers already wrote into ``output_uri`` (one per rank,
            :func:`cap_dist.finetune.sharded_io.write_rank_shard`); their masks were checked before.
        zeros: ``{param name: (zero count, numel)}`` of the trained masked weights.
        student_manifest: the manifest of the pruning output that was finetuned.
        history: the per-epoch metrics rows.
        info: run facts recorded under the manifest's ``finetune`` key.
    """
    from cap_dist.output import structure_shapes_of, write_output

    root = output_uri.rstrip("/")
    digests = {}
    title = f"finetune of {student_manifest['recipe']['model']['source']}"
    for name, data in ((METRICS, metrics_table_bytes(history)), (CURVES, curves_png_bytes(history, title))):
        atomic_write_bytes(f"{root}/{name}", data)
        digests[name] = hashlib.sha256(data).hexdigest()
    rows = layer_rows(student_manifest.get("layers") or [], zeros)
    timings = {"train": float(sum(row.get("seconds") or 0.0 for row in history))}
    out_recipe = recipe.model_copy(update={"output": output_uri})
    return write_output(out_recipe, None, rows, dict(student_manifest["input"]), timings,
                        # Written by a Ray Train group, so the Ray engine's key, as every other output names its engine.
                        extra={"engine": "ray", "finetune": info}, extra_files=digests, shards=list(shards),
                        structured=structure_shapes_of(info["student"], dict(student_manifest)))
