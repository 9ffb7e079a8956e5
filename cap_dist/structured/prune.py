"""Structured pruning of a whole model, in place: find the structures, capture each consumer layer's input Hessian
on the calibration images (dense activations, one pass), measure each structure's loss curve with its method,
allocate a number of groups to remove per structure to reach the target, then remove them with the exact re-solve
of the consumer's kept columns and shrink the modules physically.

    records = prune_structured(model, [x for x, _ in batches], recipe.structured)
    shapes = structure_shapes(find_structures(model))          # model.json's "structured"
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.config import StructuredConfig
from cap_dist.models.kind import model_kind
from cap_dist.models.capture import collect_hessians, flattened_weight, input_means, set_flattened_weight
from cap_dist.models.structures import Structure, branch_norm, find_structures, remove_branch, remove_groups
from cap_dist.solvers.numerics import layer_energy
from cap_dist.solvers.structured import (damped_inverse, greedy_group_obs, group_loss, magnitude_group_scores,
                                         oneshot_group_scores, solve_kept_columns)
from cap_dist.structured.allocate import (BudgetError, Savings, lagrangian_counts, linear_savings,
                                          output_scaled_curves, probe_counts, uniform_counts)
from cap_dist.structured.branches import branch_constant, branch_relative_loss
from cap_dist.structured.costs import GroupCost, group_costs, module_macs, total_params
from cap_dist.storage import exists
from cap_dist.structured.latency import LatencyTable, load_table, measure_latency, save_table
from cap_dist.structured.search import greedy_output_counts, refine_counts, removal_levels
from cap_dist.structured.trial import OutputProbe, first_images, trial_weights

log = logging.getLogger(__name__)


@dataclass
class StructureRecord:
    """What happened to one structure (a row of the output's ``structured.json`` section)."""

    name: str
    kind: str
    consumer: str
    groups: int
    kept: int                 # 0: the whole branch was removed (structured.branches)
    method: str
    allocation: str           # the allocation whose counts were used (calibrated: the guard's winner)
    rel_error: float          # ‖(Ŵ−W)X‖²/‖WX‖² of the consumer on the calibration inputs (undamped H)
    macs_per_group: float
    params_per_group: int
    latency_per_group_us: float | None = None   # measure=latency: the timed saving of one group (microseconds)
    latency_branch_us: float | None = None      # measure=latency, branches: the timed saving of the whole branch

    def row(self) -> dict:
        return asdict(self)


@dataclass
class LayerCurve:
    """One structure's removal order and cumulative relative loss after 0..depth removals."""

    order: torch.Tensor
    curve: torch.Tensor


def removal_curve(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure, depth: int,
                  cfg: StructuredConfig, mean_input: torch.Tensor | None = None) -> LayerCurve:
    """The method's order of removal and its loss estimate after each count, relative to the layer's energy
    (magnitude: the removed share of the squared weight norm, its own criterion). ``depth`` equal to the
    structure's groups (a whole branch, ``mean_input`` given) ends the curve with the exact loss of the branch
    replaced by its mean output (magnitude: 1, all of the weight)."""
    if depth == structure.groups:
        if mean_input is None:
            raise ValueError(f"{structure.name}: removing every group needs the consumer's mean input")
        partial = removal_curve(weight, hessian, structure, depth - 1, cfg)
        last = 1.0 if cfg.method == "magnitude" else branch_relative_loss(weight, hessian, mean_input)
        order = torch.cat([partial.order, _missing(partial.order, structure.groups)])
        return LayerCurve(order, torch.cat([partial.curve, torch.tensor([last], dtype=torch.float64)]))
    groups = structure.columns()
    w = weight.double()
    if cfg.method == "cap":
        res = greedy_group_obs(w, hessian, groups, depth, damp=cfg.damp, damp_mode=cfg.damp_mode)
        order, steps = res.order, res.losses
        scale = layer_energy(w, hessian.double())
    elif cfg.method == "obs":
        scores = oneshot_group_scores(w, damped_inverse(hessian, cfg.damp, cfg.damp_mode), groups)
        order = torch.argsort(scores, stable=True)[:depth]
        steps, scale = scores[order], layer_energy(w, hessian.double())
    else:
        scores = magnitude_group_scores(w, groups).pow(2)
        order = torch.argsort(scores, stable=True)[:depth]
        steps, scale = scores[order], float(w.pow(2).sum())
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), steps.double().cumsum(0)]) / max(scale, 1e-300)
    return LayerCurve(order, curve)


def _missing(order: torch.Tensor, groups: int) -> torch.Tensor:
    alive = torch.ones(groups, dtype=torch.bool)
    alive[order] = False
    return alive.nonzero().squeeze(1)


def valid_counts(structure: Structure, limit: int, multiple_of: int, partial_limit: int | None = None) -> torch.Tensor:
    """``[limit + 1]`` bools: which numbers of removed groups leave the consumer a width that is a multiple of
    ``multiple_of`` (removing none is always allowed: the module stays as it was). With ``partial_limit`` below
    ``limit`` (= the structure's groups: a removable branch), counts between the two are not allowed."""
    kept = structure.groups - torch.arange(limit + 1)
    valid = (kept * structure.group_size) % multiple_of == 0
    valid[0] = True
    if partial_limit is not None:
        valid[partial_limit + 1:limit] = False
    return valid


def model_total(model: nn.Module, macs: dict[str, float], measure: str) -> float:
    """The whole model's MACs per image (``flops``) or parameters (``params``)."""
    return sum(macs.values()) if measure == "flops" else float(total_params(model))


@dataclass
class StructuredPlan:
    """Everything the allocation needs, from one calibration pass on the dense model."""

    structures: list[Structure]
    consumers: dict[str, nn.Module]
    hessians: dict[str, torch.Tensor]
    curves: dict[str, LayerCurve]
    costs: dict[str, GroupCost]
    unit: dict[str, float]          # what one group saves in the target's measure (the slope, for latency)
    savings: Savings                # what removing k = 0 .. limit groups saves, per structure
    valid: dict[str, torch.Tensor]  # which counts each structure allows
    total: float                    # the dense model's MACs, parameters or seconds per forward pass
    budget: float                   # how much of it to remove
    latency: LatencyTable | None = None   # measure=latency: the timed table behind ``unit`` and ``total``
    means: dict[str, torch.Tensor] = field(default_factory=dict)   # consumer -> mean input (removable branches)

    def trial_weight(self, name: str, count: int, damp: float, damp_mode: str) -> torch.Tensor:
        """The consumer's re-solved weight with the first ``count`` groups of the structure's order removed (all
        of them: zero; :meth:`trial_constant` then carries the branch's mean output)."""
        s = next(x for x in self.structures if x.name == name)
        weight = flattened_weight(self.consumers[s.consumer])
        if count == s.groups:
            return torch.zeros_like(weight)
        removed = s.columns()[self.curves[name].order[:count]].reshape(-1)
        return solve_kept_columns(weight, self.hessians[s.consumer], removed, damp=damp,
                                  damp_mode=damp_mode).to(weight.dtype)

    def trial(self, counts: dict[str, int], damp: float, damp_mode: str,
              cache: dict[tuple[str, int], torch.Tensor] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What :func:`cap_dist.structured.trial.trial_weights` needs to run the model as if ``counts`` groups
        were removed per structure: the consumers' trial weights and the removed branches' constants, by consumer
        name.  ``cache`` keeps the re-solved weights by (structure, count) across calls with the same damping (a
        search tries each count many times)."""
        cache = {} if cache is None else cache
        for n, k in counts.items():
            if k and (n, k) not in cache:
                cache[(n, k)] = self.trial_weight(n, k, damp, damp_mode)
        consumer = {s.name: s.consumer for s in self.structures}
        weights = {consumer[n]: cache[(n, k)] for n, k in counts.items() if k}
        constants = {consumer[n]: c for n, k in counts.items() if k and (c := self.trial_constant(n, k)) is not None}
        return weights, constants

    def trial_constant(self, name: str, count: int) -> torch.Tensor | None:
        """What the consumer outputs under the trial when every group goes (the branch's mean output), else
        None."""
        s = next(x for x in self.structures if x.name == name)
        if count < s.groups:
            return None
        consumer = self.consumers[s.consumer]
        return branch_constant(flattened_weight(consumer), consumer.bias, self.means[s.consumer]).to(
            consumer.weight.dtype)


@dataclass
class Allocation:
    """The chosen counts and, for ``calibrated``, every candidate's output error on the calibration images."""

    counts: dict[str, int]
    chosen: str
    candidates: dict[str, float] = field(default_factory=dict)    # candidate -> mean output error per image
    candidate_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)          # structure -> count its sensitivity was probed at
    sensitivity: dict[str, float] = field(default_factory=dict)   # structure -> output error with it alone cut there
    probe: OutputProbe | None = None                               # the dense outputs the errors are measured against
    search: dict[str, float] = field(default_factory=dict)        # the output search: images, passes, seconds


def plan_structured(model: nn.Module, inputs: list[torch.Tensor], cfg: StructuredConfig) -> StructuredPlan:
    """Find the structures, capture their consumers' input Hessians (one pass on the dense model) and measure every
    structure's loss curve with the method."""
    structures = find_structures(model, tuple(cfg.structures), tuple(cfg.ignore))
    macs = module_macs(model, inputs[0][:1])
    costs = group_costs(model, structures, macs)
    latency = None
    whole = {s.name for s in structures if cfg.branches and branch_norm(model, s.name) is not None}
    partial = {s.name: min(s.groups - 1, math.floor(cfg.max_fraction * s.groups)) for s in structures}
    limits = {s.name: s.groups if s.name in whole else partial[s.name] for s in structures}
    valid = {s.name: valid_counts(s, limits[s.name], cfg.multiple_of, partial[s.name]) for s in structures}
    if cfg.measure == "latency":
        latency = latency_table(model, structures, inputs, cfg, branches=bool(whole))
        unit, total = latency_units(latency), latency.model_seconds
        savings = {s.name: _floored(latency.savings(s.name, s.groups, limits[s.name]), unit[s.name])
                   for s in structures}
        log.info("latency table at batch %d: model %.3f ms; per group %s%s", latency.batch, 1e3 * total,
                 ", ".join(f"{n} {1e6 * v:.1f} us" for n, v in latency.per_group.items()),
                 "; whole branches " + ", ".join(f"{n} {1e6 * v:.1f} us" for n, v in latency.branch.items())
                 if latency.branch else "")
    else:
        unit = {s.name: (costs[s.name].macs if cfg.measure == "flops" else float(costs[s.name].params))
                for s in structures}
        total = model_total(model, macs, cfg.measure)
        savings = linear_savings(unit, {n: k + 1 for n, k in limits.items()})
    check_reachable(savings, valid, total, cfg)
    consumers = {s.consumer: model.get_submodule(s.consumer) for s in structures}

    def run() -> None:
        for x in inputs:
            model(x)

    hessians, means = hessians_and_means(run, consumers, {s.consumer for s in structures if s.name in whole})
    curves: dict[str, LayerCurve] = {}
    for s in tqdm(structures, desc=f"structured curves ({cfg.method})", unit="module", leave=False):
        curves[s.name] = removal_curve(flattened_weight(consumers[s.consumer]), hessians[s.consumer], s,
                                       limits[s.name], cfg, means.get(s.consumer))
    return StructuredPlan(structures, consumers, hessians, curves, costs, unit, savings, valid, total,
                          (1.0 - cfg.target) * total, latency, means)


def hessians_and_means(run: Callable[[], object], consumers: dict[str, nn.Module],
                       with_means: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every consumer's input Hessian and, for those in ``with_means`` (removable branches), its mean input, from
    one calibration pass (both captures hook the same run)."""
    accs = {}

    def capture() -> None:
        accs.update(collect_hessians(run, consumers))

    means = input_means(capture, {n: consumers[n] for n in with_means}) if with_means else {}
    if not with_means:
        capture()
    return {name: acc.hessian() for name, acc in accs.items()}, means


def _floored(saved: torch.Tensor, unit: float) -> torch.Tensor:
    """A timed savings curve with every count saving at least ``unit`` per group (the floor of
    :func:`latency_units`), so a structure whose time did not fall still has a positive cost."""
    return torch.maximum(saved, unit * torch.arange(len(saved), dtype=torch.float64))


def latency_table(model: nn.Module, structures: list[Structure], inputs: list[torch.Tensor],
                  cfg: StructuredConfig, branches: bool) -> LatencyTable:
    """The latency table: timed here, or read from ``cfg.latency_table`` when that file exists (timed here and
    written there when it does not), so several prunes of one model can be allocated on one table."""
    path = cfg.latency_table
    if path is not None and exists(path):
        log.info("latency table read from %s", path)
        return load_table(path, structures, cfg.latency_batch, branches)
    table = measure_latency(model, structures, inputs, cfg.latency_batch, branches=branches)
    if path is not None:
        device = next((p.device.type for p in model.parameters()), "cpu")
        save_table(table, path, structures, torch.get_num_threads(), device)
        log.info("latency table written to %s", path)
    return table


def measure_name(cfg: StructuredConfig) -> str:
    """What ``cfg.target`` is a fraction of, in words."""
    return {"flops": "MACs", "params": "parameters",
            "latency": f"measured latency at batch {cfg.latency_batch}"}[cfg.measure]


def check_reachable(savings: Savings, valid: dict[str, torch.Tensor], total: float,
                    cfg: StructuredConfig) -> None:
    """Refuse a target the structures cannot reach even at their limits, saying what the least reachable is."""
    reachable = sum(float(savings[n][int(v.nonzero().max())]) for n, v in valid.items())
    least = 1.0 - reachable / total if total > 0 else 1.0
    if cfg.target < least - 1e-9:
        what = measure_name(cfg)
        hint = (" (the rest is the embedding, norms, head and per-call overhead; a larger structured.latency_batch "
                "leaves less of it)" if cfg.measure == "latency" else "")
        if not cfg.branches:
            hint += "; structured.branches: true also lets whole attention / MLP branches of ViT blocks go"
        raise BudgetError(f"structured.target={cfg.target} keeps less of the {what} than removable structures allow: "
                          f"at structured.max_fraction={cfg.max_fraction} at least {least:.3f} stays{hint}; raise "
                          "the target or max_fraction")


def latency_units(table: LatencyTable) -> dict[str, float]:
    """Seconds one group saves, with structures whose time did not fall with width at a floor of a millionth of
    the largest saving: never chosen for a saving they do not give, but still a valid (positive) cost."""
    floor = 1e-6 * max(table.per_group.values())
    return {n: max(v, floor) for n, v in table.per_group.items()}


def structure_curves(plan: StructuredPlan) -> dict[str, torch.Tensor]:
    """The layer loss curves with the counts a width rule forbids at an infinite loss."""
    return {n: torch.where(plan.valid[n], c.curve, torch.inf) for n, c in plan.curves.items()}


def allocate(plan: StructuredPlan, model: nn.Module, inputs: list[torch.Tensor],
             cfg: StructuredConfig) -> Allocation:
    """Groups to remove per structure, as ``cfg.allocation`` says (see :class:`StructuredConfig`)."""
    uniform = uniform_counts({s.name: s.groups for s in plan.structures}, plan.valid, plan.savings, plan.budget)
    if cfg.allocation == "uniform":
        return Allocation(uniform, "uniform")
    layer_global = lagrangian_counts(structure_curves(plan), plan.savings, plan.budget)
    if cfg.allocation == "global":
        return Allocation(layer_global, "global")
    probe = OutputProbe(model, inputs, model_kind(model))
    weights: dict[tuple[str, int], torch.Tensor] = {}

    def error_of(counts: dict[str, int], on: OutputProbe = probe) -> float:
        with trial_weights(plan.consumers, *plan.trial(counts, cfg.damp, cfg.damp_mode, weights)):
            return on.error()

    probes = probe_counts(uniform, plan.valid)
    sensitivity = {}
    for s in tqdm(plan.structures, desc="structured output sensitivity", unit="module", leave=False):
        sensitivity[s.name] = error_of({s.name: probes[s.name]})
    scaled = output_scaled_curves(structure_curves(plan), probes, sensitivity)
    calibrated = lagrangian_counts(scaled, plan.savings, plan.budget)
    candidates = {"calibrated": calibrated, "global": layer_global, "uniform": uniform}
    errors = {name: error_of(counts) for name, counts in candidates.items()}
    search: dict[str, float] = {}
    if cfg.search:
        subset = cfg.search_images is not None and cfg.search_images < probe.images
        on = OutputProbe(model, first_images(inputs, cfg.search_images), probe.kind) if subset else probe
        search = {"images": on.images, **_search(plan, cfg, lambda counts: error_of(counts, on),
                                                  error_of if subset else None, candidates, errors)}
    chosen = min(errors, key=errors.__getitem__)
    log.info("structured allocation candidates (mean output error per calibration image): %s; chose %s",
             ", ".join(f"{n} {e:.4g}" for n, e in errors.items()), chosen)
    constant = probe.constant_error()
    if errors[chosen] >= constant:
        raise BudgetError(
            f"structured.target={cfg.target} of the {measure_name(cfg)} loses the model: the best allocation "
            f"({chosen}) has output error {errors[chosen]:.4g} per calibration image, no better than predicting "
            f"the same output for every image ({constant:.4g}); raise structured.target"
            + ("" if cfg.search else " or set structured.search: true"))
    return Allocation(candidates[chosen], chosen, errors, candidates, probes, sensitivity, probe, search)


def _search(plan: StructuredPlan, cfg: StructuredConfig, error_of: Callable[[dict[str, int]], float],
            full_error_of: Callable[[dict[str, int]], float] | None,
            candidates: dict[str, dict[str, int]], errors: dict[str, float]) -> dict[str, float]:
    """Add the output-guided candidates (cap_dist/structured/search.py): ``greedy``, built one level at a time on
    the measured output error, then ``refined``, a local search from the best candidate so far; both within
    ``cfg.search_passes`` forward passes.  ``error_of`` is the search's probe; where it runs on a subset of the
    calibration images (``cfg.search_images``), ``full_error_of`` measures the two results on all of them, so that
    every candidate is compared on the same images.  Returns what the search cost (images per pass, passes,
    seconds)."""
    levels = removal_levels(plan.valid, {s.name: s.groups for s in plan.structures})
    start = time.perf_counter()
    greedy = greedy_output_counts(levels, plan.savings, plan.budget, error_of, cfg.search_passes)
    other = min(errors, key=errors.__getitem__)                 # the best candidate before the search
    other_error = errors[other] if full_error_of is None else error_of(candidates[other])   # on the search's images
    candidates["greedy"] = greedy.counts
    first, start_error = ("greedy", greedy.error) if greedy.error <= other_error else (other, other_error)
    left = cfg.search_passes - greedy.passes - (full_error_of is not None)
    refined = refine_counts(candidates[first], levels, plan.savings, plan.budget, error_of, left, start_error)
    candidates["refined"] = refined.counts
    if full_error_of is None:
        errors["greedy"], errors["refined"] = greedy.error, refined.error
    else:
        errors["greedy"], errors["refined"] = full_error_of(greedy.counts), full_error_of(refined.counts)
    images = f"the first {cfg.search_images} calibration images" if full_error_of else "the calibration images"
    log.info("structured output search on %s: greedy %.4g in %d passes, then refined from %s %.4g to %.4g in "
             "%d%s; %.1f s%s", images, greedy.error, greedy.passes, first, start_error, refined.error,
             refined.passes, " (stopped at structured.search_passes)" if refined.passes >= left else "",
             time.perf_counter() - start,
             f"; on every calibration image greedy {errors['greedy']:.4g}, refined {errors['refined']:.4g}"
             if full_error_of else "")
    return {"greedy_passes": greedy.passes, "refine_passes": refined.passes, "seconds": time.perf_counter() - start}


def prune_structured(model: nn.Module, inputs: list[torch.Tensor], cfg: StructuredConfig) -> list[StructureRecord]:
    """Remove structures from ``model`` (eval mode, on its device) in place until it keeps ``cfg.target`` of its
    compute or parameters; returns a record per structure, in module order."""
    plan = plan_structured(model, inputs, cfg)
    allocation = allocate(plan, model, inputs, cfg)
    counts = allocation.counts

    def run() -> None:
        for x in inputs:
            model(x)

    records = []
    for s in tqdm(plan.structures, desc=f"structured ({cfg.mode})", unit="module", leave=False):
        consumer = plan.consumers[s.consumer]
        hessian = plan.hessians.pop(s.consumer)
        order = plan.curves[s.name].order[:counts[s.name]]
        mean = plan.means.get(s.consumer)
        if counts[s.name] == s.groups:                 # the whole branch: no order to re-choose
            if cfg.mode == "sequential":              # re-calibrated on the pruned modules before it
                h, m = hessians_and_means(run, {s.consumer: consumer}, {s.consumer})
                hessian, mean = h[s.consumer], m[s.consumer]
            record = _remove_whole(model, s, consumer, hessian, mean, plan.costs[s.name], cfg, allocation.chosen)
        else:
            if cfg.mode == "sequential" and counts[s.name]:    # re-calibrated on the pruned modules before it
                hessian = collect_hessians(run, {s.consumer: consumer})[s.consumer].hessian()
                order = removal_curve(flattened_weight(consumer), hessian, s, counts[s.name], cfg).order
            record = _apply(model, s, consumer, hessian, order, plan.costs[s.name], cfg, allocation.chosen)
        if plan.latency is not None:
            record.latency_per_group_us = 1e6 * plan.latency.per_group[s.name]
            if s.name in plan.latency.branch:
                record.latency_branch_us = 1e6 * plan.latency.branch[s.name]
        records.append(record)
    saved = sum(float(plan.savings[n][k]) for n, k in counts.items())
    predicted = " (predicted by the timed table)" if cfg.measure == "latency" else ""
    log.info("structured (%s, %s): kept %.1f%% of the %s%s", cfg.method, allocation.chosen,
             100 * (1 - saved / plan.total), measure_name(cfg), predicted)
    return records


def _remove_whole(model: nn.Module, structure: Structure, consumer: nn.Module, hessian: torch.Tensor,
                  mean: torch.Tensor, cost: GroupCost, cfg: StructuredConfig, allocation: str) -> StructureRecord:
    """Replace the structure's whole branch by its mean output (:mod:`cap_dist.structured.branches`)."""
    weight = flattened_weight(consumer)
    rel = branch_relative_loss(weight, hessian, mean)
    remove_branch(model, structure, branch_constant(weight, consumer.bias, mean))
    return StructureRecord(structure.name, structure.kind, structure.consumer, structure.groups, 0, cfg.method,
                           allocation, rel, cost.macs, cost.params)


def _apply(model: nn.Module, structure: Structure, consumer: nn.Module, hessian: torch.Tensor,
           removed: torch.Tensor, cost: GroupCost, cfg: StructuredConfig, allocation: str) -> StructureRecord:
    """Re-solve the consumer's kept columns exactly, write it, and shrink the module to the kept groups."""
    weight = flattened_weight(consumer).clone()
    pruned = weight.double()
    if removed.numel():
        pruned = solve_kept_columns(weight, hessian, structure.columns()[removed].reshape(-1), damp=cfg.damp,
                                    damp_mode=cfg.damp_mode)
    h = hessian.double()
    energy = layer_energy(weight.double(), h)
    rel = group_loss(weight, pruned, h) / energy if energy > 0 else float("nan")
    set_flattened_weight(consumer, pruned.to(weight.dtype))
    alive = torch.ones(structure.groups, dtype=torch.bool)
    alive[removed] = False
    if removed.numel():
        remove_groups(model, structure, alive.nonzero().squeeze(1))
    return StructureRecord(structure.name, structure.kind, structure.consumer, structure.groups,
                           int(alive.sum()), cfg.method, allocation, rel, cost.macs, cost.params)
