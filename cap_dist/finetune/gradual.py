"""CAP's gradual schedule: prune to s_1, finetune, prune the finetuned model to s_2, finetune, ... up to the final
sparsity (``cap-dist run``). One-shot + finetune is the one-step case.

Each step is an ordinary pruning run (the Ray engine or the single process, as the recipe says) whose model source
is the previous step's finetuned output; the solvers keep every weight that is already zero pruned
(``prune.keep_zeros``), so masks only grow. After every step the driver checks that on disk: a weight that was
zero before the step is zero in the pruned and in the finetuned model.

Layout under ``recipe.output``::

    step-1-of-4/pruned/      pruning output at s_1 (model.json, weights, report.parquet, sparsity.json)
    step-1-of-4/finetuned/   finetuning output (same format + metrics.parquet, curves.png)
    ...
    train/                   Ray Train checkpoints (finetune.storage_path)
    run.json                 per-step summary, written last; ``final`` names the last finetuned model

A rerun of the same recipe reuses every finished step (a pruning output with the same recipe hash, a finished
finetuning output) and continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from cap_dist.config import ModelConfig, Recipe
from cap_dist.config import ScheduleConfig
from cap_dist.finetune.schedule import schedule_sparsities
from cap_dist.storage import atomic_write_bytes

log = logging.getLogger(__name__)


class MaskViolationError(RuntimeError):
    """A weight pruned at an earlier step is non-zero after a later one."""


def step_recipes(recipe: Recipe) -> list[tuple[float, str, str]]:
    """``(sparsity, pruned_uri, finetuned_uri)`` of every step of the schedule."""
    if recipe.finetune is None:
        raise ValueError("cap-dist run needs a finetune section (what recovers the model after every pruning "
                         "step); to prune only, use cap-dist prune")
    if recipe.prune.pattern.structured:
        if recipe.schedule.steps != 1:
            raise ValueError(f"pattern {recipe.prune.pattern} fixes the sparsity; use schedule.steps=1 (one-shot "
                             "N:M + finetune)")
        levels = [recipe.prune.pattern.sparsity]
    elif recipe.structured is not None and recipe.prune.sparsity == 0:
        if recipe.schedule.steps != 1:
            raise ValueError("structured pruning alone (prune.sparsity=0) is one step: use schedule.steps=1 "
                             "(structured prune + finetune), or give prune.sparsity for later steps")
        levels = [0.0]
    else:
        levels = schedule_sparsities(recipe.schedule, recipe.prune.sparsity)
    root = recipe.output.rstrip("/")
    n = len(levels)
    return [(s, f"{root}/step-{k + 1}-of-{n}/pruned", f"{root}/step-{k + 1}-of-{n}/finetuned")
            for k, s in enumerate(levels)]


def _prune_recipe(recipe: Recipe, model: ModelConfig, sparsity: float, output: str, first: bool = True) -> Recipe:
    """One step's pruning recipe; structures are removed in the first step only (later steps start from the
    finetuned smaller model, whose model.json keeps its shapes)."""
    prune = recipe.prune.model_copy(update={"sparsity": sparsity, "keep_zeros": True})
    return recipe.model_copy(update={"model": model, "prune": prune, "output": output, "finetune": None,
                                     "schedule": ScheduleConfig(), "structured": recipe.structured if first else None})


def _finished(uri: str, recipe_hash: str | None = None) -> dict[str, Any] | None:
    """The manifest of a finished output at ``uri`` (for pruning outputs: of the same recipe), else None."""
    from cap_dist.output import read_manifest

    try:
        manifest = read_manifest(uri)
    except FileNotFoundError:
        return None
    if recipe_hash is not None and manifest.get("recipe_hash") != recipe_hash:
        return None
    return manifest


def _prune(step: Recipe) -> dict[str, Any]:
    from cap_dist.engines import prune

    return prune(step).manifest


def _layer_weights(uri: str, layers: list[str]) -> dict[str, torch.Tensor]:
    """The pruned layers' weights of an output (single file or sharded), by ranged reads of the files holding
    them; each file's size is checked against the manifest first (a truncated shard is named, not misread)."""
    from cap_dist.output import load_output_subset, read_manifest

    return load_output_subset(uri, read_manifest(uri), [f"{name}.weight" for name in layers])


def check_masks_kept(before_uri: str, after_uri: str, layers: list[str]) -> int:
    """Raise if a weight that is zero in ``before_uri`` is non-zero in ``after_uri``; return how many zeros
    were checked. Reads only the pruned layers' weights (ranged reads, local or remote)."""
    before, after = _layer_weights(before_uri, layers), _layer_weights(after_uri, layers)
    checked = 0
    for key, old in before.items():
        zero = old == 0
        revived = int((after[key][zero] != 0).sum())
        if revived:
            raise MaskViolationError(f"{revived} weights of {key} that are zero in {before_uri} are non-zero in "
                                     f"{after_uri}")
        checked += int(zero.sum())
    return checked


def run_gradual(recipe: Recipe) -> dict[str, Any]:
    """Run the whole schedule; returns the summary written to ``<output>/run.json``."""
    from cap_dist import storage
    from cap_dist.finetune.trainer import finetune

    storage.configure(recipe.storage)
    steps = step_recipes(recipe)
    start = time.perf_counter()
    model = recipe.model
    previous: str | None = None
    rows: list[dict[str, Any]] = []
    for k, (sparsity, pruned_uri, tuned_uri) in enumerate(steps):
        step = _prune_recipe(recipe, model, sparsity, pruned_uri, first=k == 0)
        row: dict[str, Any] = {"step": k + 1, "target_sparsity": sparsity, "pruned": pruned_uri,
                               "finetuned": tuned_uri}
        t0 = time.perf_counter()
        manifest = _finished(pruned_uri, step.hash)
        row["prune_reused"] = manifest is not None
        if manifest is None:
            log.info("step %d/%d: pruning %s to %.1f%%", k + 1, len(steps), model.source, 100 * sparsity)
            manifest = _prune(step)
        row["prune_seconds"] = time.perf_counter() - t0
        row["sparsity"] = manifest["sparsity"]
        layers = [r["layer"] for r in manifest["layers"]]
        if previous is not None:
            row["zeros_checked_after_prune"] = check_masks_kept(previous, pruned_uri, layers)

        t0 = time.perf_counter()
        tuned = _finished(tuned_uri)
        row["finetune_reused"] = tuned is not None
        if tuned is None:
            log.info("step %d/%d: finetuning at %.1f%%", k + 1, len(steps), 100 * manifest["sparsity"])
            summary = finetune(recipe, pruned_uri, tuned_uri, step_index=k, sparsity=sparsity)
            row["finetune"] = summary.get("metrics", {})
        row["finetune_seconds"] = time.perf_counter() - t0
        row["zeros_checked_after_finetune"] = check_masks_kept(pruned_uri, tuned_uri, layers)
        rows.append(row)
        previous = tuned_uri
        model = ModelConfig(source=tuned_uri, targets=recipe.model.targets, ignore=recipe.model.ignore)
    summary = {"recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe.hash, "steps": rows,
               "final": previous, "seconds": time.perf_counter() - start}
    atomic_write_bytes(f"{recipe.output.rstrip('/')}/run.json", json.dumps(summary, indent=1, default=str).encode())
    return summary
