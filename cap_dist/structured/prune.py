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
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.config import StructuredConfig
from cap_dist.models.kind import model_kind
from cap_dist.models.capture import collect_hessians, flattened_weight, set_flattened_weight
from cap_dist.models.structures import Structure, find_structures, remove_groups
from cap_dist.solvers.numerics import layer_energy
from cap_dist.solvers.structured import (damped_inverse, greedy_group_obs, group_loss, magnitude_group_scores,
                                         oneshot_group_scores, solve_kept_columns)
from cap_dist.structured.allocate import (BudgetError, lagrangian_counts, output_scaled_curves, probe_counts,
                                          uniform_counts)
from cap_dist.structured.costs import GroupCost, group_costs, module_macs, total_params
from cap_dist.structured.latency import LatencyTable, measure_latency
from cap_dist.structured.trial import OutputProbe, trial_weights

log = logging.getLogger(__name__)


@dataclass
class StructureRecord:
    """What happened to one structure (a row of the output's ``structured.json`` section)."""

    name: str
    kind: str
    consumer: str
    groups: int
    kept: int
    method: str
    allocation: str           # the allocation whose counts were used (calibrated: the guard's winner)
    rel_error: float          # ‖(Ŵ−W)X‖²/‖WX‖² of the consumer on the calibration inputs (undamped H)
    macs_per_group: float
    params_per_group: int
    latency_per_group_us: float | None = None   # measure=latency: the timed saving of one group (microseconds)

    def row(self) -> dict:
        return asdict(self)


@dataclass
class LayerCurve:
    """One structure's removal order and cumulative relative loss after 0..depth removals."""

    order: torch.Tensor
    curve: torch.Tensor


def removal_curve(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure, depth: int,
                  cfg: StructuredConfig) -> LayerCurve:
    """The method's order of removal and its loss estimate after each count, relative to the layer's energy
    (magnitude: the removed share of the squared weight norm, its own criterion)."""
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


def valid_counts(structure: Structure, limit: int, multiple_of: int) -> torch.Tensor:
    """``[limit + 1]`` bools: which numbers of removed groups leave the consumer a width that is a multiple of
    ``multiple_of`` (removing none is always allowed: the module stays as it was)."""
    kept = structure.groups - torch.arange(limit + 1)
    valid = (kept * structure.group_size) % multiple_of == 0
    valid[0] = True
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
    unit: dict[str, float]          # what one group saves in the target's measure
    valid: dict[str, torch.Tensor]  # which counts each structure allows
    total: float                    # the dense model's MACs, parameters or seconds per forward pass
    budget: float                   # how much of it to remove
    latency: LatencyTable | None = None   # measure=latency: the timed table behind ``unit`` and ``total``

    def trial_weight(self, name: str, count: int, damp: float, damp_mode: str) -> torch.Tensor:
        """The consumer's re-solved weight with the first ``count`` groups of the structure's order removed."""
        s = next(x for x in self.structures if x.name == name)
        weight = flattened_weight(self.consumers[s.consumer])
        removed = s.columns()[self.curves[name].order[:count]].reshape(-1)
        return solve_kept_columns(weight, self.hessians[s.consumer], removed, damp=damp,
                                  damp_mode=damp_mode).to(weight.dtype)


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


def plan_structured(model: nn.Module, inputs: list[torch.Tensor], cfg: StructuredConfig) -> StructuredPlan:
    """Find the structures, capture their consumers' input Hessians (one pass on the dense model) and measure every
    structure's loss curve with the method."""
    structures = find_structures(model, tuple(cfg.structures), tuple(cfg.ignore))
    macs = module_macs(model, inputs[0][:1])
    costs = group_costs(model, structures, macs)
    latency = None
    if cfg.measure == "latency":
        latency = measure_latency(model, structures, inputs, cfg.latency_batch)
        unit, total = latency_units(latency), latency.model_seconds
        log.info("latency table at batch %d: model %.3f ms; per group %s", latency.batch, 1e3 * total,
                 ", ".join(f"{n} {1e6 * v:.1f} us" for n, v in latency.per_group.items()))
    else:
        unit = {s.name: (costs[s.name].macs if cfg.measure == "flops" else float(costs[s.name].params))
                for s in structures}
        total = model_total(model, macs, cfg.measure)
    limits = {s.name: min(s.groups - 1, math.floor(cfg.max_fraction * s.groups)) for s in structures}
    valid = {s.name: valid_counts(s, limits[s.name], cfg.multiple_of) for s in structures}
    check_reachable(unit, valid, total, cfg)
    consumers = {s.consumer: model.get_submodule(s.consumer) for s in structures}

    def run() -> None:
        for x in inputs:
            model(x)

    accs = collect_hessians(run, consumers)
    hessians = {name: acc.hessian() for name, acc in accs.items()}
    curves: dict[str, LayerCurve] = {}
    for s in tqdm(structures, desc=f"structured curves ({cfg.method})", unit="module", leave=False):
        curves[s.name] = removal_curve(flattened_weight(consumers[s.consumer]), hessians[s.consumer], s,
                                       limits[s.name], cfg)
    return StructuredPlan(structures, consumers, hessians, curves, costs, unit, valid, total,
                          (1.0 - cfg.target) * total, latency)


def measure_name(cfg: StructuredConfig) -> str:
    """What ``cfg.target`` is a fraction of, in words."""
    return {"flops": "MACs", "params": "parameters",
            "latency": f"measured latency at batch {cfg.latency_batch}"}[cfg.measure]


def check_reachable(unit: dict[str, float], valid: dict[str, torch.Tensor], total: float,
                    cfg: StructuredConfig) -> None:
    """Refuse a target the structures cannot reach even at their limits, saying what the least reachable is."""
    reachable = sum(unit[n] * int(v.nonzero().max()) for n, v in valid.items())
    least = 1.0 - reachable / total if total > 0 else 1.0
    if cfg.target < least - 1e-9:
        what = measure_name(cfg)
        hint = (" (the rest is the embedding, norms, head and per-call overhead; a larger structured.latency_batch "
                "leaves less of it)" if cfg.measure == "latency" else "")
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
    uniform = uniform_counts({s.name: s.groups for s in plan.structures}, plan.valid, plan.unit, plan.budget)
    if cfg.allocation == "uniform":
        return Allocation(uniform, "uniform")
    layer_global = lagrangian_counts(structure_curves(plan), plan.unit, plan.budget)
    if cfg.allocation == "global":
        return Allocation(layer_global, "global")
    probe = OutputProbe(model, inputs, model_kind(model))
    weights: dict[tuple[str, int], torch.Tensor] = {}

    def error_of(counts: dict[str, int]) -> float:
        for n, k in counts.items():
            if k and (n, k) not in weights:
                weights[(n, k)] = plan.trial_weight(n, k, cfg.damp, cfg.damp_mode)
        consumer = {s.name: s.consumer for s in plan.structures}
        with trial_weights(plan.consumers, {consumer[n]: weights[(n, k)] for n, k in counts.items() if k}):
            return probe.error()

    probes = probe_counts(uniform, plan.valid)
    sensitivity = {}
    for s in tqdm(plan.structures, desc="structured output sensitivity", unit="module", leave=False):
        sensitivity[s.name] = error_of({s.name: probes[s.name]})
    scaled = output_scaled_curves(structure_curves(plan), probes, sensitivity)
    calibrated = lagrangian_counts(scaled, plan.unit, plan.budget)
    candidates = {"calibrated": calibrated, "global": layer_global, "uniform": uniform}
    errors = {name: error_of(counts) for name, counts in candidates.items()}
    chosen = min(errors, key=errors.__getitem__)
    log.info("structured allocation candidates (mean output error per calibration image): %s; chose %s",
             ", ".join(f"{n} {e:.4g}" for n, e in errors.items()), chosen)
    return Allocation(candidates[chosen], chosen, errors, candidates, probes, sensitivity, probe)


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
        if cfg.mode == "sequential" and counts[s.name]:    # re-calibrated on the pruned modules before it
            hessian = collect_hessians(run, {s.consumer: consumer})[s.consumer].hessian()
            order = removal_curve(flattened_weight(consumer), hessian, s, counts[s.name], cfg).order
        record = _apply(model, s, consumer, hessian, order, plan.costs[s.name], cfg, allocation.chosen)
        if plan.latency is not None:
            record.latency_per_group_us = 1e6 * plan.latency.per_group[s.name]
        records.append(record)
    saved = sum(plan.unit[n] * k for n, k in counts.items())
    predicted = " (predicted by the timed table)" if cfg.measure == "latency" else ""
    log.info("structured (%s, %s): kept %.1f%% of the %s%s", cfg.method, allocation.chosen,
             100 * (1 - saved / plan.total), measure_name(cfg), predicted)
    return records


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
