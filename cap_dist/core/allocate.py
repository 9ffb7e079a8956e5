"""How sparse each layer becomes: the recipe's one level everywhere (``allocation: uniform``, or the level an
N:M pattern fixes), or a global allocation from every layer's removal-loss curve (``allocation: global``).

The one implementation both engines use: each engine computes the curves where the Hessians live
(:func:`cap_dist.core.solve.loss_curve`: in one process, or on the actors) and hands them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from cap_dist.solvers import LossCurve, allocate_global

if TYPE_CHECKING:
    from cap_dist.config import PruneConfig


def needs_loss_curves(cfg: "PruneConfig") -> bool:
    return cfg.allocation == "global"


def curve_depth(cfg: "PruneConfig") -> float:
    """How deep a layer's loss curve goes: halfway from the cap on any layer's sparsity to 1, so the allocation
    can move a layer up to the cap with the curve measured, not extrapolated, around it."""
    return min(1.0, cfg.max_layer_sparsity + 0.5 * (1.0 - cfg.max_layer_sparsity))


def uniform_levels(cfg: "PruneConfig", layers: Iterable[str]) -> dict[str, float]:
    return {name: cfg.layer_sparsity for name in layers}


def global_levels(cfg: "PruneConfig", curves: Mapping[str, LossCurve]) -> dict[str, float]:
    """Per-layer sparsities reaching ``cfg.sparsity`` overall at the least total normalised loss. Input-Hessian
    losses are divided by each layer's output energy (relative output error, comparable across layers);
    Fisher losses already share one scale (the model's loss)."""
    return allocate_global(dict(curves), cfg.sparsity, normalize=cfg.curvature == "activations",
                           max_layer_sparsity=cfg.max_layer_sparsity)


def layer_levels(cfg: "PruneConfig", layers: Iterable[str],
                 curves: Mapping[str, LossCurve] | None = None) -> dict[str, float]:
    """Every layer's target sparsity as the recipe asks; global allocation needs ``curves``."""
    if not needs_loss_curves(cfg):
        return uniform_levels(cfg, layers)
    if curves is None:
        raise ValueError("allocation=global needs every layer's loss curve")
    return global_levels(cfg, curves)
