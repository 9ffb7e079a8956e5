"""Layer solvers: pure torch (no Ray, no I/O).  The stable entry point is :func:`prune_layer`.

Example::

    from cap_dist.solvers import HessianAccumulator, prune_layer
    acc = HessianAccumulator(columns=384); acc.add_linear_input(x)        # x: [..., 384]
    res = prune_layer(layer.weight, acc.hessian(), method="cap", sparsity=0.5, block_size=128)
    layer.weight.data = res.weight
"""

from __future__ import annotations

import time

import torch

from cap_dist.solvers import baselines
from cap_dist.solvers.cap import cap_activation, cap_fisher
from cap_dist.solvers.curvature import FisherAccumulator, HessianAccumulator
from cap_dist.solvers.numerics import (DAMP_MODES, check_damp_mode, check_weight_hessian, layer_energy, quadratic_loss,
                                       relative_error)
from cap_dist.solvers.polish import ADMM_RHO, admm_masks, better_rows, refine_masks, resolve_weights
from cap_dist.solvers.patterns import (LossCurve, Pattern, allocate_global, allocate_uniform, check_divisible,
                                       check_sparsity, is_valid_n_m, parse_pattern)
from cap_dist.solvers.result import LayerResult

METHODS = ("cap", "sparsegpt", "obs", "wanda", "magnitude")
DEFAULT_CAP_BLOCK = 128
"""The block size recipes use for `cap` unless they say otherwise (see bench/solvers.py for why)."""
DEFAULT_SPARSEGPT_BLOCK = 128
DEFAULT_CAP_ADMM = 100
"""The cap of ADMM iterations recipes run after `cap` (``prune.admm_iterations``); ADMM stops earlier once the
mask stops moving (after 40-90 iterations on the bench/peers.py layers).  With ``resolve`` this put `cap` at or
below upstream ALPS's error on every layer of bench/peers.py, where a faster penalty schedule (fewer
iterations) did not (bench/results/peers.json)."""

DEFAULT_POLISH_DAMP = 1e-3
"""The damping of the curvature that refine, ADMM and the re-solve minimise when ``polish_damp`` is not given,
whatever the method's own ``damp``.  bench/damping.py: the greedy needs its 0.01 on an ill-conditioned layer
(the loud 768×3072: at 1e-3 plain CAP's error is 6 % higher, at 1e-4 14 %), the polish does not (its steps are
guarded on the undamped objective) and minimises a closer objective at 1e-3: lower error in 19 of the 24
bench/peers.py cells (up to 7 %: the loud layer at 2:4, EfficientNet's conv_pwl), equal in 1, at most 1.3 %
higher in 4, in the same time."""

DEFAULT_REFINE_BLOCK = 256
"""Columns per block of the refinement sweeps when ``refine_block`` is not given (capped at the layer width)."""

__all__ = ["DAMP_MODES", "DEFAULT_CAP_ADMM", "DEFAULT_CAP_BLOCK", "DEFAULT_POLISH_DAMP", "METHODS", "relative_error", "FisherAccumulator", "HessianAccumulator", "LayerResult", "LossCurve", "Pattern",
           "allocate_global", "allocate_uniform", "is_valid_n_m", "keep_kept_nonzero", "parse_pattern", "prune_layer"]


def _check_prior(prior_mask: torch.Tensor | None, weight: torch.Tensor, sparsity: float, pat: Pattern,
                 fisher: bool) -> torch.Tensor | None:
    """The prior mask as bool on the weight's device, or None when nothing is pruned yet."""
    if prior_mask is None:
        return None
    if tuple(prior_mask.shape) != tuple(weight.shape):
        raise ValueError(f"prior_mask has shape {tuple(prior_mask.shape)}; the weight is {tuple(weight.shape)}")
    prior = prior_mask.to(device=weight.device, dtype=torch.bool)
    if not bool(prior.any()):
        return None
    if fisher:
        raise ValueError(f"{int(prior.sum())} weights are already zero and must stay pruned (prior_mask), which "
                         "needs activation curvature: set prune.curvature=activations, or prune.keep_zeros=false "
                         "to let Fisher curvature treat them as ordinary weights")
    fraction = float(prior.float().mean())
    if not pat.structured and fraction > sparsity + 1e-9:
        raise ValueError(f"{fraction:.2%} of the weights are already pruned, more than the target "
                         f"sparsity={sparsity:.2%}; gradual pruning only adds zeros")
    return prior


def prune_layer(weight: torch.Tensor, hessian: torch.Tensor, *, method: str, sparsity: float,
                pattern: str | Pattern = "unstructured", block_size: int | None = DEFAULT_CAP_BLOCK,
                damp: float = 0.01,
                backend: str = "auto", max_row_sparsity: float | None = None,
                prior_mask: torch.Tensor | None = None, damp_mode: str = "relative", refine: int = 0,
                refine_block: int | None = None, admm: int = 0, admm_rho: float = ADMM_RHO,
                resolve: bool = False, polish_damp: float | None = None, loss_curve: bool = True) -> LayerResult:
    """Prune one layer.

    Args:
        weight: ``[out, in]`` (a Conv2d weight flattened to ``[out, in·kh·kw]``).
        hessian: input Hessian ``[in, in]`` (H = 2/N Σ x xᵀ), or Fisher blocks ``[numel/B, B, B]``.
        method: ``cap``, ``sparsegpt``, ``obs``, ``wanda`` or ``magnitude``.
        sparsity: fraction of weights removed, in [0, 1) (ignored for N:M, which fixes it).
        pattern: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive inputs).
        block_size: ``cap``: columns per block (default 128, the recipes' default; None = whole rows, the
            exact OBC, O(rows·in³): hours on a ViT-g layer); ``sparsegpt``: lazy batch size (None = 128).  Fisher curvature takes its block size from ``hessian``.
        damp: relative damping per input, H_ii ← H_ii·(1 + damp) + damp·1e-4·mean(diag H).
        backend: ``cap`` inner loop: ``auto`` (numba on CPU, torch elsewhere), ``numba``, ``torch``.
        max_row_sparsity: ``cap``: deepest fraction of a block any row may lose (the greedy's early
            stop; default halfway between the target and 1).
        prior_mask: bool ``[out, in]``, True where a weight is already pruned and must stay pruned (the
            masks of earlier steps of gradual pruning). Every method removes these first; the target
            ``sparsity`` must be at least their fraction.
        damp_mode: ``"relative"`` (the default above) or ``"mean"``: λ = damp·mean(diag H) added to every
            input, dead inputs at H_ii = 1 — upstream SparseGPT's damping (``damp=0.01`` is its ``percdamp``),
            so that ``sparsegpt`` and ``obs`` can run as their papers describe them (``sparsegpt`` and ``obs``
            then also zero the weights of dead inputs first, as upstream does).  ``wanda`` uses no damping.
        refine: mask refinement sweeps after the method (0 = off): every block of ``refine_block`` columns
            is searched again by CAP's exact greedy OBS with the rest of the layer fixed, and a row takes the
            new block mask and weights only when the exact objective falls (see :mod:`.polish`).  Per-row
            counts, N:M groups and ``prior_mask`` are kept; unstructured blocks may re-spread removals over
            rows.  Activation curvature only.
        refine_block: columns per refinement block (default ``min(in, 256)``; a multiple of M for N:M).
        admm: at most this many ADMM iterations on the mask after the method and ``refine`` (0 = off),
            warm-started from their solution and its exact dual — the mechanism of ALPS (Meng et al. 2024),
            which moves masks across the whole layer, not block by block.  Costs about one [rows, in]·[in, in]
            product per iteration and a Cholesky factor of the in×in curvature every third.  Use with
            ``resolve``.  The layer's exact count, N:M groups and ``prior_mask`` are kept.  Activation
            curvature only.
        admm_rho: ADMM's starting penalty on the unit-diagonal scaled curvature (smaller moves more of the
            mask; it grows while the mask moves).
        resolve: after the method (and refinement), re-solve every row's kept weights exactly for the
            layer's quadratic (batched conjugate gradients, float64); rows that would not improve on the
            undamped H keep their weights.  Activation curvature only.
        polish_damp: damping (in ``damp_mode``) of the curvature that ``refine``, ``admm`` and ``resolve``
            minimise (default :data:`DEFAULT_POLISH_DAMP`, whatever ``damp`` is).  Smaller is closer to the true
            objective; their results are guarded on the undamped one.
        loss_curve: ``cap`` with an input Hessian: also trace the layer's loss against sparsity (the result's
            ``curve``, up to ``max_row_sparsity``, for global allocation).  ``False`` saves about a quarter of
            the greedy: each block is searched only as deep as its allocation needs (rows that reach that
            depth are searched further), with the same masks and weights; ``curve`` is then None.

    Returns:
        A :class:`LayerResult` on the device of ``weight``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise TypeError("weight and hessian must be torch tensors")
    check_weight_hessian(weight, hessian)
    pat = parse_pattern(pattern)
    sparsity = pat.sparsity if pat.structured else check_sparsity(sparsity)
    check_divisible(weight.shape[1], pat)
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size={block_size} must be a positive integer or None (whole rows)")
    if hessian.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but hessian on {hessian.device}; put both on one device")
    fisher = hessian.ndim == 3
    check_damp_mode(damp_mode)
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine={refine!r} must be a number of sweeps >= 0")
    if refine_block is not None and (not isinstance(refine_block, int) or refine_block <= 0):
        raise ValueError(f"refine_block={refine_block} must be a positive integer or None")
    if polish_damp is not None and polish_damp < 0:
        raise ValueError(f"polish_damp={polish_damp} must be >= 0")
    if not isinstance(admm, int) or isinstance(admm, bool) or admm < 0:
        raise ValueError(f"admm={admm!r} must be a number of iterations >= 0")
    if not admm_rho > 0:
        raise ValueError(f"admm_rho={admm_rho} must be > 0")
    if fisher and (refine or resolve or admm):
        raise ValueError("refine, admm and resolve need input-activation curvature (an [in, in] Hessian), not "
                         "Fisher blocks")
    prior = _check_prior(prior_mask, weight, sparsity, pat, fisher)
    start = time.perf_counter()
    if method == "cap":
        if fisher:
            out = cap_fisher(weight, hessian, sparsity, pat, damp, backend, max_row_sparsity, damp_mode)
        else:
            out = cap_activation(weight, hessian, sparsity, pat, block_size, damp, backend, max_row_sparsity,
                                 prior, damp_mode, loss_curve)
    elif method == "sparsegpt":
        out = baselines.sparsegpt(weight, hessian, sparsity, pat, damp, block_size or DEFAULT_SPARSEGPT_BLOCK,
                                  prior, damp_mode)
    elif method == "obs":
        out = baselines.obs_oneshot(weight, hessian, sparsity, pat, damp, prior, damp_mode)
    elif method == "wanda":
        out = baselines.wanda(weight, hessian, sparsity, pat, prior)
    else:
        out = baselines.magnitude(weight, sparsity, pat, prior)
    if prior is not None and bool((out["mask"] & prior).any()):
        raise RuntimeError(f"{method} kept {int((out['mask'] & prior).sum())} weights that were already pruned; "
                           "this is a bug in cap-dist, please report it")
    if refine or resolve or admm:
        out = _polish(out, weight, hessian, pat, prior, refine, refine_block, admm, admm_rho, resolve,
                      DEFAULT_POLISH_DAMP if polish_damp is None else polish_damp, damp_mode, backend)
    seconds = time.perf_counter() - start
    pruned, nudged = keep_kept_nonzero(out["weight"].to(weight.dtype), out["mask"], weight)
    if nudged:
        out["info"]["kept_zeros_stored_as_tiny"] = nudged
    exact = torch.float64 if weight.dtype == torch.float64 else torch.float32
    h = hessian.to(exact)
    polished = "resolve_loss" in out["info"] and not out["info"].get("polish_reverted")
    if polished and out["weight"].dtype == weight.dtype:     # the re-solve's own loss of these very weights,
        loss = out["info"]["resolve_loss"]                   # in float64 on the undamped H: no product again
    else:
        loss = quadratic_loss(pruned.to(exact) - weight.to(exact), h)
    energy = layer_energy(weight.to(exact), h)
    curve = out["curve"].curve(energy) if out["curve"] is not None else None
    info = dict(out["info"], method=method, pattern=str(pat), seconds=seconds,
                curvature="fisher" if fisher else "activations")
    return LayerResult(weight=pruned, mask=out["mask"], losses=out["losses"].to(weight.dtype), loss=loss,
                       energy=energy, curve=curve, removal_step=out.get("removal_step"), info=info)


def keep_kept_nonzero(pruned: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Store every kept weight that came out exactly 0, though its dense value was not, as the smallest normal
    number of its dtype with the dense weight's sign; returns the weights and how many were changed.

    Shard files and finetuning recover masks as ``weight != 0``, so such a weight would silently count as pruned
    (one extra zero: a float32 coincidence of ADMM's iterate that a guarded re-solve kept; seen once in ~10⁶
    weights).  Its objective changes by ~tiny².  Dense weights that are already 0 stay 0."""
    lost = mask & (pruned == 0) & (dense != 0)
    count = int(lost.sum())
    if not count:
        return pruned, 0
    tiny = torch.full_like(pruned, torch.finfo(pruned.dtype).tiny)
    return torch.where(lost, torch.copysign(tiny, dense.to(pruned.dtype)), pruned), count


def _polish(out: dict, weight: torch.Tensor, hessian: torch.Tensor, pat: Pattern, prior: torch.Tensor | None,
            refine: int, refine_block: int | None, admm: int, admm_rho: float, resolve: bool, damp: float,
            damp_mode: str,
            backend: str) -> dict:
    """Refinement sweeps and the exact re-solve on a method's result (see :mod:`cap_dist.solvers.polish`).

    The whole layer falls back to the method's own result if polishing did not lower the undamped objective
    (it minimises the damped one), so ``refine``/``resolve`` never make a layer worse on its own inputs."""
    w, keep = out["weight"], out["mask"]
    info = dict(out["info"])
    if refine:
        width = min(weight.shape[1], refine_block or DEFAULT_REFINE_BLOCK)
        if pat.structured:
            width = max(pat.m, width // pat.m * pat.m)
        w, keep, extra = refine_masks(weight, w, keep, hessian, pat, prior, width=width, sweeps=refine,
                                      damp=damp, damp_mode=damp_mode, backend=backend)
        info.update(extra)
    alternative = None
    if admm:
        before_admm = keep
        w, keep, extra = admm_masks(weight, w, keep, hessian, pat, prior, iterations=admm, damp=damp,
                                    damp_mode=damp_mode, rho=admm_rho)
        alternative = extra.pop("admm_alternative", None)
        info.update(extra)
    if resolve:
        w, extra = resolve_weights(weight, w, keep, hessian, damp=damp, damp_mode=damp_mode)
        rows_loss = extra.pop("row_objective")
        if alternative is not None:            # ADMM ended flipping between two supports: the re-solved decide
            other_keep, other_start = alternative       # rows the supports share re-solve to the same weights:
            differ = (other_keep != keep).any(1)          # only the few rows that differ are solved again, from
            start = torch.where(keep[differ], w[differ], other_start[differ])   # the re-solved weights they share
            part_w, other_extra = resolve_weights(weight[differ], start, other_keep[differ], hessian,
                                                  damp=damp, damp_mode=damp_mode)
            other_w, other_rows = w.clone(), rows_loss.clone()
            other_w[differ], other_rows[differ] = part_w, other_extra.pop("row_objective")
            w, keep, rows_loss, chosen = better_rows((w, keep, rows_loss), (other_w, other_keep, other_rows))
            extra.update(resolve_seconds=extra["resolve_seconds"] + other_extra["resolve_seconds"],
                         resolve_loss=0.5 * float(rows_loss.sum()),
                         admm_support_choice="re-solved choice" if chosen["base"] == "second"
                         else "projection's choice", admm_support_rows_swapped=chosen["rows_from_other"])
            info["admm_moved"] = int((keep != before_admm).sum()) // 2
        info.update(extra)
    h = hessian.double()
    before = quadratic_loss(out["weight"].double() - weight.double(), h)
    after = info["resolve_loss"] if resolve else quadratic_loss(w.double() - weight.double(), h)  # the guard's
    info.update(polish_damp=damp, loss_before_polish=before)
    if after > before:
        info["polish_reverted"] = True
        return dict(out, info=info)
    changed = out["mask"] != keep
    losses = out["losses"]
    if bool(changed.any()):                    # a refined mask has no greedy trace (the curve stays the greedy's)
        losses = torch.zeros_like(losses)
        out = dict(out, removal_step=None)
    return dict(out, weight=w, mask=keep, losses=losses, info=info)
