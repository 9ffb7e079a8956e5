"""The local engine: the whole prune in one process (``engine: local``), on the CPU or one GPU.

Modes:

* ``sequential``: block by block; a block's layers are calibrated on the outputs of the already pruned
  blocks before it (errors do not compound silently), then the block's pruned outputs feed the next.
* ``independent``: every layer calibrated on dense activations in one pass; the layers are then
  independent problems (what the Ray engine solves in parallel, and must reproduce).

Global allocation first reads every layer's loss curve from its dense curvature, chooses per-layer sparsities,
then prunes with those. Last, BatchNorm statistics are re-estimated on the calibration images
(``prune.batchnorm``; :mod:`cap_dist.core.batchnorm`). Every step is a function of :mod:`cap_dist.core`; this module only decides the order.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.config import Recipe
from cap_dist.core import (Accumulator, Batch, LayerRecord, PruneResult, check_layers_fit, collect_fisher,
                           curve_depth, dense_curvature, device_of, layer_levels, layer_table, loss_curve,
                           model_stages, needs_loss_curves, peek_curvature, run_stage_over, select_layers,
                           solve_layer, solve_stage, take_curvature)
from cap_dist.core.batchnorm import batchnorm_layers, reestimate_batchnorm
from cap_dist.models.source import ModelSource

log = logging.getLogger(__name__)


def prune_model(recipe: Recipe, model: nn.Module, batches: list[Batch],
                layers: dict[str, nn.Module]) -> tuple[list[LayerRecord], dict[str, float]]:
    """Prune ``layers`` of ``model`` in place as the recipe says; returns per-layer records and timings."""
    cfg = recipe.prune
    timings: dict[str, float] = {"calibrate": 0.0, "solve": 0.0, "allocate": 0.0}
    dense: dict[str, Accumulator] | None = None
    if cfg.mode == "independent" or needs_loss_curves(cfg):
        start = time.perf_counter()
        dense = dense_curvature(model, layers, batches, cfg.curvature, cfg.fisher_block_size, recipe.calibration.seed,
                                cfg.float64_hessians, cfg.hessian_products == "float32")
        timings["calibrate"] += time.perf_counter() - start
    curves = None
    if needs_loss_curves(cfg):
        start = time.perf_counter()
        depth = curve_depth(cfg)
        curves = {name: loss_curve(module, peek_curvature(dense[name]), cfg, depth)
                  for name, module in tqdm(layers.items(), desc="loss curves", unit="layer", leave=False)}
        timings["allocate"] = time.perf_counter() - start
    levels = layer_levels(cfg, layers, curves)
    if cfg.mode == "independent":
        start = time.perf_counter()
        records = [solve_layer(name, "independent", module, take_curvature(dense.pop(name)), cfg, levels[name])
                   for name, module in tqdm(layers.items(), desc="solve", unit="layer")]   # each H freed once used
        timings["solve"] += time.perf_counter() - start
    else:
        dense = None                  # sequential mode recalibrates every block: free the dense curvature
        records = _sequential(recipe, model, batches, layers, levels, timings)
    if cfg.batchnorm == "reestimate" and batchnorm_layers(model):
        start = time.perf_counter()
        reestimate_batchnorm(model, model_stages(model, layers, batches[0][0][:1]), [x for x, _ in batches])
        timings["batchnorm"] = time.perf_counter() - start
    return records, timings


def _sequential(recipe: Recipe, model: nn.Module, batches: list[Batch], layers: dict[str, nn.Module],
                levels: dict[str, float], timings: dict[str, float]) -> list[LayerRecord]:
    cfg = recipe.prune
    records: list[LayerRecord] = []
    stages = model_stages(model, layers, batches[0][0][:1])
    hidden = [x for x, _ in batches]
    bar = tqdm(stages, desc="sequential", unit="stage")
    for stage in bar:
        if stage.layers:
            bar.set_postfix_str(stage.name)
            if cfg.curvature == "fisher":
                start = time.perf_counter()
                accs = collect_fisher(model, stage.layers, batches, cfg.fisher_block_size, recipe.calibration.seed,
                                      cfg.float64_hessians)
                timings["calibrate"] += time.perf_counter() - start
                start = time.perf_counter()
                records += [solve_layer(name, stage.name, module, take_curvature(accs[name]), cfg, levels[name])
                            for name, module in stage.layers.items()]
                timings["solve"] += time.perf_counter() - start
            else:
                records += solve_stage(stage, hidden, cfg, levels, timings)
        start = time.perf_counter()
        hidden = run_stage_over(stage, hidden)
        timings["calibrate"] += time.perf_counter() - start
    return records


def load_on_device(recipe: Recipe, source: ModelSource) -> tuple[nn.Module, dict, torch.device]:
    """The source's model on the recipe's device (threads set as the recipe says), its input preprocessing, and
    the device."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    model = source.load()
    input_spec = source.input_spec(model)
    device = device_of(recipe.device)
    return model.to(device), input_spec, device


def calibration_batches(recipe: Recipe, input_spec: dict, device: torch.device) -> list[Batch]:
    """The recipe's calibration images (and labels) as batches on ``device``."""
    from cap_dist.data.draw import draw_batches

    return [(x.to(device), None if y is None else y.to(device))
            for x, y in draw_batches(recipe.calibration, input_spec, purpose="calibration")]


def prune_local(recipe: Recipe, source: ModelSource | None = None, write: bool = True) -> PruneResult:
    """Prune the model a recipe describes in this process and (by default) write the result to ``recipe.output``.

    ``source``: the recipe's model source, already parsed (by :func:`cap_dist.engines.prune`)."""
    total = time.perf_counter()
    source = source if source is not None else ModelSource.of(recipe.model)
    model, input_spec, device = load_on_device(recipe, source)
    layers = select_layers(model, recipe.model)
    check_layers_fit(recipe.prune, layers)
    t_load = time.perf_counter() - total
    start = time.perf_counter()
    batches = calibration_batches(recipe, input_spec, device)
    t_data = time.perf_counter() - start
    cfg = recipe.prune
    log.info("pruning %d layers of %s with %s (%s, %s mode)", len(layers), recipe.model.source, cfg.method,
             cfg.pattern if cfg.pattern.structured else f"{cfg.sparsity:.0%}", cfg.mode)
    records, timings = prune_model(recipe, model, batches, layers)
    timings.update(load=t_load, data=t_data, total=time.perf_counter() - total)
    result = PruneResult(recipe=recipe, engine="local", layers=records, timings=timings, input_spec=input_spec,
                         model=model.cpu())
    if write:
        from cap_dist.models.source import state_dict_for_save
        from cap_dist.output import write_output

        result.manifest = write_output(recipe, state_dict_for_save(result.model), [r.row() for r in records],
                                       input_spec, timings, extra={"engine": "local"}, source=source)
    print(layer_table(records))
    return result
