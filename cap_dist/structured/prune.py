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
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist.config import StructuredConfig
from cap_dist.models.capture import collect_hessians, flattened_weight, set_flattened_weight
from cap_dist.models.structures import Structure, find_structures, remove_groups
from cap_dist.solvers.numerics import layer_energy
from cap_dist.solvers.structured import (damped_inverse, greedy_group_obs, group_loss, magnitude_group_scores,
                                         oneshot_group_scores, solve_kept_columns)
from cap_dist.structured.allocate import lagrangian_counts, uniform_counts
from cap_dist.structured.costs import GroupCost, group_costs, module_macs, total_params

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
    rel_error: float          # ‖(Ŵ−W)X‖²/‖WX‖² of the consumer on the calibration inputs (undamped H)
    macs_per_group: float
    params_per_group: int

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


def prune_structured(model: nn.Module, inputs: list[torch.Tensor], cfg: StructuredConfig) -> list[StructureRecord]:
    """Remove structures from ``model`` (eval mode, on its device) in place until it keeps ``cfg.target`` of its
    compute or parameters; returns a record per structure, in module order."""
    structures = find_structures(model, tuple(cfg.structures), tuple(cfg.ignore))
    macs = module_macs(model, inputs[0][:1])
    costs = group_costs(model, structures, macs)
    unit = {s.name: (costs[s.name].macs if cfg.measure == "flops" else float(costs[s.name].params))
            for s in structures}
    total = model_total(model, macs, cfg.measure)
    budget = (1.0 - cfg.target) * total
    consumers = {s.consumer: model.get_submodule(s.consumer) for s in structures}

    def run() -> None:
        for x in inputs:
            model(x)

    accs = collect_hessians(run, consumers)
    limits = {s.name: min(s.groups - 1, math.floor(cfg.max_fraction * s.groups)) for s in structures}
    curves: dict[str, LayerCurve] = {}
    for s in tqdm(structures, desc=f"structured curves ({cfg.method})", unit="module", leave=False):
        curves[s.name] = removal_curve(flattened_weight(consumers[s.consumer]), accs[s.consumer].hessian(), s,
                                       limits[s.name], cfg)
    valid = {s.name: valid_counts(s, limits[s.name], cfg.multiple_of) for s in structures}
    if cfg.allocation == "global":
        counts = lagrangian_counts({n: torch.where(valid[n], c.curve, torch.inf) for n, c in curves.items()}, unit,
                                   budget)
    else:
        counts = uniform_counts({s.name: s.groups for s in structures}, valid, unit, budget)
    records = []
    for s in tqdm(structures, desc=f"structured ({cfg.mode})", unit="module", leave=False):
        hessian = accs.pop(s.consumer).hessian()
        order = curves[s.name].order[:counts[s.name]]
        if cfg.mode == "sequential" and counts[s.name]:    # re-calibrated on the pruned modules before it
            layer = {s.consumer: consumers[s.consumer]}
            hessian = collect_hessians(run, layer)[s.consumer].hessian()
            order = removal_curve(flattened_weight(consumers[s.consumer]), hessian, s, counts[s.name], cfg).order
        records.append(_apply(model, s, consumers[s.consumer], hessian, order, costs[s.name], cfg))
    saved = sum(unit[n] * k for n, k in counts.items())
    log.info("structured (%s, %s): kept %.1f%% of the %s", cfg.method, cfg.allocation, 100 * (1 - saved / total),
             "MACs" if cfg.measure == "flops" else "parameters")
    return records


def _apply(model: nn.Module, structure: Structure, consumer: nn.Module, hessian: torch.Tensor,
           removed: torch.Tensor, cost: GroupCost, cfg: StructuredConfig) -> StructureRecord:
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
                           int(alive.sum()), cfg.method, rel, cost.macs, cost.params)
