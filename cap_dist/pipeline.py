"""The single-process pruning pipeline: calibrate -> (allocate) -> solve -> write.

    from cap_dist import prune
    report = prune("jobs/vit4mnist.yaml", ["prune.sparsity=0.75"])

Modes:
* ``sequential``: block by block; a block's layers are calibrated on the outputs of the already pruned
  blocks before it (errors do not compound silently), then the block's pruned outputs feed the next.
* ``independent``: every layer calibrated on dense activations in one pass; the layers are then
  independent problems (what the distributed engine solves in parallel, and must reproduce).

Global allocation first solves every layer with ``cap`` on dense calibration to get its loss curve,
chooses per-layer sparsities (``allocate_global``), then prunes with those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.config import Recipe, load_recipe
from cap_dist.models.capture import flattened_weight, layer_columns, set_flattened_weight
from cap_dist.models.loading import load_model
from cap_dist.solvers import (FisherAccumulator, HessianAccumulator, LayerResult, LossCurve, allocate_global,
                              prune_layer)
from cap_dist.solvers.numerics import quadratic_loss
from cap_dist.solvers.patterns import parse_pattern
from cap_dist.solvers.quantize import DEFAULT_BLOCK as QUANT_BLOCK, quantize

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class LayerRecord:
    """One pruned layer, as written to sparsity.json and report.parquet."""

    layer: str
    stage: str
    rows: int
    columns: int
    numel: int
    target_sparsity: float
    sparsity: float
    loss: float
    rel_error: float
    seconds: float
    damp_used: float | None
    escalations: int
    quant_bits: int | None = None          # prune.quantize: loss/rel_error then measure pruned + quantized vs dense
    quant_group_size: int | None = None
    quant_loss: float | None = None        # the quantization's own loss, over the pruned weights
    quant_zeroed: int | None = None        # kept weights whose code is 0 (now zero, though the mask keeps them)


@dataclass
class PruneReport:
    recipe: Recipe
    model: nn.Module
    input_spec: dict[str, Any]
    layers: list[LayerRecord]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        total = sum(r.numel for r in self.layers)
        return sum(r.sparsity * r.numel for r in self.layers) / total if total else 0.0


# ----------------------------------------------------------------------------------------------------
# Calibration data


def calibration_batches(recipe: Recipe, input_spec: dict[str, Any]) -> list[Batch]:
    """The recipe's calibration images, preprocessed, as a list of (x, y) batches held in memory."""
    from cap_dist.data.draw import draw_batches

    return draw_batches(recipe.calibration, input_spec, purpose="calibration")


# ----------------------------------------------------------------------------------------------------
# Curvature


def _stage_hessians(run_stage: Callable[[], None], layers: dict[str, nn.Module], float64: bool,
                    accs: dict[str, HessianAccumulator] | None = None) -> dict[str, HessianAccumulator]:
    """Run a stage with forward pre-hooks that fold each layer's input into its accumulator (new ones, or
    ``accs`` to keep accumulating across calls in the same order as one long run)."""
    from cap_dist.models.capture import _fold_conv_input  # the one place that unfolds conv inputs

    if accs is None:
        # Sums live where the layer lives: on a GPU the inputs never cross to the host.
        accs = {name: HessianAccumulator(layer_columns(m), float64=float64, device=m.weight.device)
                for name, m in layers.items()}
    handles = []
    for name, module in layers.items():
        acc = accs[name]

        def hook(mod: nn.Module, args: tuple, acc: HessianAccumulator = acc) -> None:
            x = args[0].detach()
            if isinstance(mod, nn.Conv2d):
                _fold_conv_input(acc, x, mod)
            else:
                acc.add_linear_input(x)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_stage()
    finally:
        for h in handles:
            h.remove()
    return accs


def _fisher(model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch], block: int,
            seed: int, float64: bool) -> dict[str, FisherAccumulator]:
    """Block empirical Fisher from per-sample gradients of the cross-entropy on labels, or on labels drawn
    from the model's own predictive distribution where the data has none (seeded)."""
    accs = {n: FisherAccumulator(m.weight.numel(), block, float64=float64) for n, m in layers.items()}
    params = {n: m.weight for n, m in layers.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            for i in range(x.shape[0]):
                logits = model(x[i:i + 1])
                if y is None or int(y[i]) < 0:
                    probs = torch.softmax(logits.detach().float().cpu(), -1)
                    target = torch.multinomial(probs, 1, generator=generator)[0].to(logits.device)
                else:
                    target = y[i:i + 1]
                loss = nn.functional.cross_entropy(logits, target)
                grads = torch.autograd.grad(loss, list(params.values()))
                for (name, _), g in zip(params.items(), grads):
                    accs[name].add_gradients(g.unsqueeze(0))
    finally:
        model.train(was_training)
    return accs


# ----------------------------------------------------------------------------------------------------
# Solving


def prior_mask_of(weight: torch.Tensor, recipe: Recipe) -> torch.Tensor | None:
    """The weights that must stay pruned: those already exactly zero (the masks of earlier gradual steps),
    unless ``prune.keep_zeros`` is off; None when there are none.

    With an N:M pattern a dense model's own zeros (dead channels, say) can fill a group of M beyond its M − N
    removals; only the first M − N of such a group are forced, the others stay kept weights (valued 0)."""
    if not recipe.prune.keep_zeros:
        return None
    prior = weight == 0
    pattern = parse_pattern(recipe.prune.pattern)
    if pattern.structured and weight.shape[1] % pattern.m == 0:
        groups = prior.reshape(prior.shape[0], -1, pattern.m)
        prior = (groups & (groups.cumsum(-1) <= pattern.n_prune)).reshape(prior.shape)
    return prior if bool(prior.any()) else None


def level_with_prior(sparsity: float, prior: torch.Tensor | None, recipe: Recipe) -> float:
    """A layer's target never drops below what it already has (global allocation may ask for less)."""
    if prior is None or parse_pattern(recipe.prune.pattern).structured:
        return sparsity
    return max(sparsity, float(prior.float().mean()))


def _solve_layer(name: str, stage: str, module: nn.Module, curvature: torch.Tensor, recipe: Recipe,
                 sparsity: float) -> LayerRecord:
    cfg = recipe.prune
    weight = flattened_weight(module).clone().float()
    prior = prior_mask_of(weight, recipe)
    sparsity = level_with_prior(sparsity, prior, recipe)
    res = prune_layer(weight, curvature.to(weight.device, torch.float32), method=cfg.method, sparsity=sparsity,
                      pattern=cfg.pattern, block_size=cfg.block_size, damp=cfg.damp, prior_mask=prior)
    record = LayerRecord(layer=name, stage=stage, rows=weight.shape[0], columns=weight.shape[1],
                         numel=weight.numel(), target_sparsity=sparsity, sparsity=res.sparsity, loss=res.loss,
                         rel_error=res.relative_error, seconds=res.info["seconds"],
                         damp_used=res.info.get("damp_used"), escalations=int(res.info.get("escalations", 0)))
    final = res.weight if cfg.quantize.bits is None else _quantize_pruned(record, weight, res, curvature, recipe)
    set_flattened_weight(module, final)
    return record


def _quantize_pruned(record: LayerRecord, dense: torch.Tensor, res: LayerResult, curvature: torch.Tensor,
                     recipe: Recipe) -> torch.Tensor:
    """Quantize the pruned layer on its own curvature and mask (pruned weights stay exactly 0); fill the
    record's quantization fields and make its loss the total, pruned + quantized against the dense weight."""
    cfg = recipe.prune
    qcfg = cfg.quantize
    h = curvature.to(dense.device, torch.float32)
    q = quantize(res.weight, h, method=qcfg.method, bits=qcfg.bits, group_size=qcfg.group_size,
                 symmetric=qcfg.symmetric, mask=res.mask, damp=cfg.damp, block_size=cfg.block_size or QUANT_BLOCK)
    record.quant_bits, record.quant_group_size, record.quant_loss = qcfg.bits, qcfg.group_size, q.loss
    record.quant_zeroed = int((res.mask & (q.weight == 0)).sum())
    record.loss = quadratic_loss(q.weight - dense, h)
    record.rel_error = record.loss / res.energy if res.energy > 0 else float("nan")
    record.seconds += q.info["seconds"]
    return q.weight


def _curvature_of(acc: HessianAccumulator | FisherAccumulator) -> torch.Tensor:
    """The layer's curvature, handed over: an input Hessian is scaled in place in its running sum (each
    accumulator serves one solve), so a model's Hessians never exist twice."""
    return acc.take_hessian() if isinstance(acc, HessianAccumulator) else acc.fisher()


def _layer_sparsity(recipe: Recipe) -> float:
    pattern = parse_pattern(recipe.prune.pattern)
    return pattern.sparsity if pattern.structured else recipe.prune.sparsity


# ----------------------------------------------------------------------------------------------------
# Stages: the model as prefix -> blocks -> suffix, each a function of the previous stage's outputs


@dataclass
class Stage:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    layers: dict[str, nn.Module]


def model_stages(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor | None) -> list[Stage]:
    """Split the model into prefix -> blocks -> suffix and give every prunable layer to the stage that runs it.

    Layers outside every block (a stem conv in the prefix, a head conv in the suffix) are placed by
    watching which stage runs them on ``example`` (one calibration input, batch of 1).
    """
    from cap_dist.models.families import split_blocks

    parts = split_blocks(model)
    stages = [Stage("prefix", parts.prefix, {})]
    stages += [Stage(name, block, {}) for name, block in parts.blocks]
    stages.append(Stage("suffix", parts.suffix, {}))
    rest: dict[str, nn.Module] = {}
    for name, module in layers.items():
        try:
            stages[1 + parts.block_of(name)].layers[name] = module
        except ValueError:
            rest[name] = module
    if rest and example is None:
        raise ValueError(f"layers {sorted(rest)[:5]} lie outside the model's blocks; the distributed engine shards "
                         "blocks only: drop them from model.targets or use the single-process pipeline")
    if rest:
        seen: dict[str, str] = {}
        current = ["prefix"]
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, current[0]))
                   for n, m in rest.items()]
        try:
            with torch.no_grad():
                h = example
                for stage in stages:
                    current[0] = stage.name
                    h = stage.run(h)
        finally:
            for handle in handles:
                handle.remove()
        for stage in stages:
            stage.layers.update({n: rest[n] for n, s in seen.items() if s == stage.name})
        missing = sorted(set(rest) - set(seen))
        if missing:
            raise ValueError(f"layers {missing[:5]} never run in the model's forward pass; remove them from targets")
    return stages


def _run_stage_over(stage: Stage, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [stage.run(h) for h in inputs]


# ----------------------------------------------------------------------------------------------------
# The pipeline


def _global_levels(recipe: Recipe, model: nn.Module, layers: dict[str, nn.Module],
                   dense_curvature: dict[str, torch.Tensor]) -> dict[str, float]:
    cfg = recipe.prune
    depth = min(1.0, cfg.max_layer_sparsity + 0.5 * (1.0 - cfg.max_layer_sparsity))
    curves: dict[str, LossCurve] = {}
    for name, module in tqdm(layers.items(), desc="loss curves", unit="layer", leave=False):
        weight = flattened_weight(module).clone().float()
        prior = prior_mask_of(weight, recipe)
        res = prune_layer(weight, dense_curvature[name].float(), method="cap",
                          sparsity=level_with_prior(cfg.sparsity, prior, recipe), block_size=cfg.block_size,
                          damp=cfg.damp, max_row_sparsity=depth, prior_mask=prior)
        curves[name] = res.curve
    return allocate_global(curves, cfg.sparsity, normalize=cfg.curvature == "activations",
                           max_layer_sparsity=cfg.max_layer_sparsity)


def _dense_curvature(recipe: Recipe, model: nn.Module, layers: dict[str, nn.Module],
                     batches: list[Batch]) -> dict[str, torch.Tensor]:
    cfg = recipe.prune
    if cfg.curvature == "fisher":
        accs = _fisher(model, layers, batches, cfg.fisher_block_size, recipe.calibration.seed, cfg.float64_hessians)
    else:
        accs = _stage_hessians(lambda: [model(x) for x, _ in batches], layers, cfg.float64_hessians)
    return {n: _curvature_of(a) for n, a in accs.items()}


def run_pruning(recipe: Recipe, model: nn.Module, batches: list[Batch],
                layers: dict[str, nn.Module]) -> tuple[list[LayerRecord], dict[str, float]]:
    """Prune ``layers`` of ``model`` in place as the recipe says; returns per-layer records and timings."""
    cfg = recipe.prune
    timings: dict[str, float] = {"calibrate": 0.0, "solve": 0.0, "allocate": 0.0}
    levels = {n: _layer_sparsity(recipe) for n in layers}
    dense: dict[str, torch.Tensor] | None = None
    if cfg.mode == "independent" or cfg.allocation == "global":
        start = time.perf_counter()
        dense = _dense_curvature(recipe, model, layers, batches)
        timings["calibrate"] += time.perf_counter() - start
    if cfg.allocation == "global":
        start = time.perf_counter()
        levels = _global_levels(recipe, model, layers, dense)
        timings["allocate"] = time.perf_counter() - start
        if cfg.mode != "independent":
            dense = None                  # sequential mode recalibrates every block: free the dense Hessians
    records: list[LayerRecord] = []
    if cfg.mode == "independent":
        start = time.perf_counter()
        for name, module in tqdm(layers.items(), desc="solve", unit="layer"):
            # popped: each Hessian is freed once its layer is solved
            records.append(_solve_layer(name, "independent", module, dense.pop(name), recipe, levels[name]))
        timings["solve"] += time.perf_counter() - start
        return records, timings
    stages = model_stages(model, layers, batches[0][0][:1])
    hidden = [x for x, _ in batches]
    bar = tqdm(stages, desc="sequential", unit="stage")
    for stage in bar:
        if stage.layers:
            bar.set_postfix_str(stage.name)
            start = time.perf_counter()
            if cfg.curvature == "fisher":
                accs = _fisher(model, stage.layers, batches, cfg.fisher_block_size, recipe.calibration.seed,
                               cfg.float64_hessians)
                timings["calibrate"] += time.perf_counter() - start
                start = time.perf_counter()
                for name, module in stage.layers.items():
                    records.append(_solve_layer(name, stage.name, module, _curvature_of(accs[name]), recipe,
                                                levels[name]))
                timings["solve"] += time.perf_counter() - start
            else:
                records += _solve_stage_on_activations(recipe, stage, hidden, levels, timings)
        start = time.perf_counter()
        hidden = _run_stage_over(stage, hidden)
        timings["calibrate"] += time.perf_counter() - start
    return records, timings


def _solve_stage_on_activations(recipe: Recipe, stage: Stage, hidden: list[torch.Tensor], levels: dict[str, float],
                                timings: dict[str, float]) -> list[LayerRecord]:
    """Solve a stage's layers on its (already pruned upstream) inputs.

    With ``true_sequential`` the layers are taken in model order and each is calibrated after the ones
    before it in the block were pruned (so fc2 sees the pruned fc1's outputs); otherwise all layers are
    calibrated once on the dense block.  One block forward per layer buys the more faithful inputs.
    """
    cfg = recipe.prune
    records = []
    pending = dict(stage.layers)
    while pending:
        start = time.perf_counter()
        accs = _stage_hessians(lambda: [stage.run(h) for h in hidden], pending, cfg.float64_hessians)
        timings["calibrate"] += time.perf_counter() - start
        batch = list(pending)[:1] if cfg.true_sequential else list(pending)
        start = time.perf_counter()
        for name in batch:
            records.append(_solve_layer(name, stage.name, pending.pop(name), _curvature_of(accs[name]), recipe,
                                        levels[name]))
        timings["solve"] += time.perf_counter() - start
    return records


def check_layers_fit(recipe: Recipe, layers: dict[str, nn.Module]) -> None:
    """Refuse, before any calibration, a pattern or quantization group that some layer's input width does not
    fit (otherwise the run fails only when it reaches that layer, after minutes or hours of work)."""
    cfg = recipe.prune
    pattern = parse_pattern(cfg.pattern)
    for what, width, key in ((f"pattern {cfg.pattern}", pattern.m if pattern.structured else 0, "prune.pattern"),
                             (f"quantize.group_size={cfg.quantize.group_size}",
                              cfg.quantize.group_size if cfg.quantize.bits else 0, "prune.quantize.group_size")):
        if not width:
            continue
        bad = [f"{name} ({layer_columns(m)} inputs)" for name, m in layers.items() if layer_columns(m) % width]
        if bad:
            raise ValueError(f"{what} needs every pruned layer's input width to be a multiple of {width}, but "
                             f"{len(bad)} layer(s) are not: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                             f"add them to model.ignore or change {key}")


def select_layers(recipe: Recipe, model: nn.Module) -> dict[str, nn.Module]:
    """The recipe's targets (fnmatch patterns), or the model family's defaults."""
    from cap_dist.models.families import select_prunable_layers

    return select_prunable_layers(model, recipe.model.targets, recipe.model.ignore)


def prune(recipe: Recipe | str, overrides: list[str] | None = None, write: bool = True) -> PruneReport:
    """Prune the model a recipe describes and (by default) write the result to ``recipe.output``."""
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe path; pass a Recipe already overridden")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    from cap_dist import storage

    storage.configure(recipe.storage)
    total = time.perf_counter()
    start = time.perf_counter()
    model, input_spec = load_model(recipe.model.source, recipe.model.weights, recipe.model.create_kwargs)
    device = _device(recipe.device)
    model.to(device)
    layers = select_layers(recipe, model)
    check_layers_fit(recipe, layers)
    t_load = time.perf_counter() - start
    start = time.perf_counter()
    batches = [(x.to(device), None if y is None else y.to(device)) for x, y in calibration_batches(recipe, input_spec)]
    t_data = time.perf_counter() - start
    log.info("pruning %d layers of %s with %s (%s, %s mode)", len(layers), recipe.model.source, recipe.prune.method,
             recipe.prune.pattern if recipe.prune.pattern != "unstructured" else f"{recipe.prune.sparsity:.0%}",
             recipe.prune.mode)
    records, timings = run_pruning(recipe, model, batches, layers)
    timings.update(load=t_load, data=t_data, total=time.perf_counter() - total)
    report = PruneReport(recipe=recipe, model=model.cpu(), input_spec=input_spec, layers=records, timings=timings)
    if write:
        from cap_dist.output import write_pruned

        write_pruned(report)
    print(layer_table(records))
    return report


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def layer_table(records: list[LayerRecord]) -> str:
    """The closing table: per-layer sparsity, relative error and time."""
    width = max((len(r.layer) for r in records), default=5)
    lines = [f"{'layer':<{width}}  {'shape':>12}  {'sparsity':>8}  {'rel.err':>9}  {'time':>7}"]
    for r in records:
        lines.append(f"{r.layer:<{width}}  {f'{r.rows}x{r.columns}':>12}  {r.sparsity:8.2%}  {r.rel_error:9.5f}  "
                     f"{r.seconds:6.2f}s")
    numel = sum(r.numel for r in records)
    if numel:
        overall = sum(r.sparsity * r.numel for r in records) / numel
        lines.append(f"{'all pruned layers':<{width}}  {numel:>12,}  {overall:8.2%}")
    return "\n".join(lines)
