"""One layer's solve, as a recipe asks for it: the weights that must stay pruned, the layer's target, the
solver (:func:`cap_dist.solvers.prune_layer`), optional quantization of what remains, and the
:class:`LayerRecord`. Also the removal-loss curve global allocation reads, and the cost estimate the Ray
planner balances. Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cap_dist.core.records import LayerRecord
from cap_dist.models.capture import flattened_weight, layer_columns, set_flattened_weight
from cap_dist.solvers import LayerResult, LossCurve, prune_layer
from cap_dist.solvers.numerics import quadratic_loss
from cap_dist.solvers.polish import ADMM_TYPICAL_ITERATIONS, admm_flops, resolve_flops
from cap_dist.solvers.quantize import quantize


if TYPE_CHECKING:
    from cap_dist.config import PruneConfig


def prior_mask_of(weight: torch.Tensor, cfg: "PruneConfig") -> torch.Tensor | None:
    """The weights that must stay pruned: those already exactly zero (the masks of earlier gradual steps),
    unless ``prune.keep_zeros`` is off; None when there are none.

    With an N:M pattern a dense model's own zeros (dead channels, say) can fill a group of M beyond its M − N
    removals; only the first M − N of such a group are forced, the others stay kept weights (valued 0)."""
    if not cfg.keep_zeros:
        return None
    prior = weight == 0
    pattern = cfg.pattern
    if pattern.structured and weight.shape[1] % pattern.m == 0:
        groups = prior.reshape(prior.shape[0], -1, pattern.m)
        prior = (groups & (groups.cumsum(-1) <= pattern.n_prune)).reshape(prior.shape)
    return prior if bool(prior.any()) else None


def level_with_prior(sparsity: float, prior: torch.Tensor | None, cfg: "PruneConfig") -> float:
    """A layer's target never drops below what it already has (global allocation may ask for less)."""
    if prior is None or cfg.pattern.structured:
        return sparsity
    return max(sparsity, float(prior.float().mean()))


def solve_layer(name: str, stage: str, module: nn.Module, curvature: torch.Tensor, cfg: "PruneConfig",
                sparsity: float) -> LayerRecord:
    """Prune ``module`` in place to ``sparsity`` on its curvature (then quantize, if the recipe says so) and
    return its record. The solver runs in float32 on the layer's device."""
    weight = flattened_weight(module).clone().float()
    prior = prior_mask_of(weight, cfg)
    sparsity = level_with_prior(sparsity, prior, cfg)
    res = prune_layer(weight, curvature.to(weight.device, torch.float32), method=cfg.method, sparsity=sparsity,
                      pattern=cfg.pattern, block_size=cfg.cap_block if cfg.method == "cap" else cfg.sweep_block,
                      damp=cfg.damp, prior_mask=prior, damp_mode=cfg.method_damp_mode, loss_curve=False,
                      **cfg.polish)
    record = LayerRecord(layer=name, stage=stage, rows=weight.shape[0], columns=weight.shape[1],
                         numel=weight.numel(), target_sparsity=sparsity, sparsity=res.sparsity, loss=res.loss,
                         rel_error=res.relative_error, seconds=res.info["seconds"],
                         damp_used=res.info.get("damp_used"), escalations=int(res.info.get("escalations", 0)))
    final = res.weight if cfg.quantize.bits is None else _quantize_pruned(record, weight, res, curvature, cfg)
    set_flattened_weight(module, final)
    return record


def _quantize_pruned(record: LayerRecord, dense: torch.Tensor, res: LayerResult, curvature: torch.Tensor,
                     cfg: "PruneConfig") -> torch.Tensor:
    """Quantize the pruned layer on its own curvature and mask (pruned weights stay exactly 0); fill the
    record's quantization fields and make its loss the total, pruned + quantized against the dense weight."""
    qcfg = cfg.quantize
    h = curvature.to(dense.device, torch.float32)
    q = quantize(res.weight, h, method=qcfg.method, bits=qcfg.bits, group_size=qcfg.group_size,
                 symmetric=qcfg.symmetric, mask=res.mask, damp=cfg.damp, block_size=cfg.sweep_block)
    record.quant_bits, record.quant_group_size, record.quant_loss = qcfg.bits, qcfg.group_size, q.loss
    record.quant_zeroed = int((res.mask & (q.weight == 0)).sum())
    record.loss = quadratic_loss(q.weight - dense, h)
    record.rel_error = record.loss / res.energy if res.energy > 0 else float("nan")
    record.seconds += q.info["seconds"]
    return q.weight


def loss_curve(module: nn.Module, curvature: torch.Tensor, cfg: "PruneConfig", depth: float) -> LossCurve:
    """The layer's removal-loss curve (loss against sparsity, up to ``depth``) from CAP on its dense curvature:
    what :func:`cap_dist.core.allocate.global_levels` compares across layers. The layer is not changed.

    No resolve/ADMM here: the curve is the greedy's removal trace (a polished mask has none), and allocation
    must stay cheap; it only ranks layers, the final solve polishes each layer at its allocated level."""
    weight = flattened_weight(module).clone().float()
    prior = prior_mask_of(weight, cfg)
    res = prune_layer(weight, curvature.float(), method="cap", sparsity=level_with_prior(cfg.sparsity, prior, cfg),
                      block_size=cfg.cap_block, damp=cfg.damp, max_row_sparsity=depth, prior_mask=prior,
                      damp_mode=cfg.method_damp_mode if cfg.method == "cap" else "relative")
    return res.curve


def estimated_solve_flops(module: nn.Module, cfg: "PruneConfig") -> float:
    """What a layer's solve costs, for balancing work across actors: CAP's greedy, rows · in · B² with B its
    block (the whole row when none), plus ADMM and the re-solve when the recipe runs them (they dominate on
    wide layers). The other methods are cheaper column sweeps and are planned alike."""
    columns = layer_columns(module)
    rows = module.weight.shape[0]
    block = min(cfg.cap_block or columns, columns)
    flops = float(rows * columns * block ** 2)
    polish = cfg.polish
    if polish["admm"]:              # the iterations where the early stop typically ends
        flops += admm_flops(rows, columns, min(polish["admm"], ADMM_TYPICAL_ITERATIONS))
    if polish["resolve"]:
        flops += resolve_flops(rows, columns)
    return flops
