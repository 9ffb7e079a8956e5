"""Curvature collection: input Hessians through the one capture path (:func:`collect_hessians`), the
block-diagonal empirical Fisher from per-sample gradients, and the hand-over of a finished curvature to its
solve. Engine-neutral: the local engine runs it around the whole model or one stage, a Ray actor around its
shard.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cap_dist.models.capture import capture_layer_inputs, collect_hessians, fold_layer_input
from cap_dist.solvers import FisherAccumulator, HessianAccumulator

Batch = tuple[torch.Tensor, torch.Tensor | None]
Accumulator = HessianAccumulator | FisherAccumulator

__all__ = ["Accumulator", "Batch", "capture_layer_inputs", "collect_fisher", "collect_hessians",
           "dense_curvature", "fold_layer_input", "peek_curvature", "take_curvature"]


def collect_fisher(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Batch], block: int,
                   seed: int, float64: bool) -> dict[str, FisherAccumulator]:
    """Block empirical Fisher from per-sample gradients of the cross-entropy on labels, or on labels drawn
    from the model's own predictive distribution where the data has none (seeded), so self-supervised or
    unlabelled calibration data still gives a Fisher."""
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


def take_curvature(acc: Accumulator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's curvature, handed over: an input Hessian is scaled in place in its running sum (each
    accumulator serves one solve), so a model's Hessians never exist twice; ``dtype`` converts it (the float64
    sum goes once the converted copy exists)."""
    if isinstance(acc, HessianAccumulator):
        return acc.take_hessian(dtype)
    fisher = acc.fisher()
    return fisher if dtype is None else fisher.to(dtype)


def peek_curvature(acc: Accumulator) -> torch.Tensor:
    """A layer's curvature without handing it over (a scaled copy): for a loss curve read before the solve
    that will take it."""
    return acc.hessian() if isinstance(acc, HessianAccumulator) else acc.fisher()


def dense_curvature(model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch], curvature: str,
                    fisher_block: int, seed: int, float64: bool, float32_products: bool = False
                    ) -> dict[str, Accumulator]:
    """Every layer's curvature on the dense model in one pass over the calibration batches."""
    if curvature == "fisher":
        return collect_fisher(model, layers, batches, fisher_block, seed, float64)
    return collect_hessians(lambda: [model(x) for x, _ in batches], layers, float64,
                            float32_products=float32_products)
