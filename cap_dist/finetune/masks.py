"""Sparsity masks kept exactly through training: a pruned weight is 0.0 after every optimizer step.

Why every step needs three touches (CAP's recovery relies on the masks never moving):

1. ``mask_gradients_`` before the step: a pruned weight's gradient is not zero (its input still fires), and
   AdamW's moments would otherwise accumulate it.
2. ``mask_optimizer_state_`` after the step: ``exp_avg`` / ``exp_avg_sq`` at pruned positions are zeroed, so
   no momentum built before the masks (a resumed or re-pruned optimizer) can push a pruned weight.
3. ``apply_masks_`` after the step: multiplies the weights, which makes the zeros exact whatever the update did
   (AdamW's decoupled weight decay ``w -= lr·wd·w`` keeps a zero at zero, but the Adam term divides by
   ``sqrt(v) + eps`` and mixed precision rounds; multiplying by the mask leaves no doubt).

With FSDP2 a parameter is a DTensor of which each rank holds a shard (``Shard(0)``: a block of rows). A mask
is sharded like its parameter (:func:`shard_masks`), so every operation here acts on local shards only, with
no communication. Plain tensors (one process, no FSDP) work the same way.

    masks = masks_from_model(student, layer_names_from_manifest(manifest))     # {param name: bool tensor}
    fully_shard(...)                                                           # then
    masked = shard_masks(masks, dict(student.named_parameters()))              # local shards
    loss.backward(); masked.mask_gradients_(); optimizer.step()
    masked.mask_optimizer_state_(optimizer); masked.apply_masks_()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class MaskViolationError(RuntimeError):
    """A pruned position holds a non-zero value: the masks were not kept."""


def layer_names_from_manifest(manifest: Mapping[str, Any]) -> list[str]:
    """Names of the pruned layers listed in a pruning manifest's ``layers`` rows (their ``layer`` key)."""
    rows = manifest.get("layers") or []
    return [str(row["layer"]) for row in rows if "layer" in row]


def pruned_layer_names(model: nn.Module, manifest: Mapping[str, Any] | None = None,
                       targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None) -> list[str]:
    """The layers whose sparsity must be kept: the manifest's rows when it has some, else the layers that
    cap_dist's selection finds (the recipe's targets, or the model family's defaults)."""
    names = layer_names_from_manifest(manifest or {})
    if names:
        return names
    from cap_dist.models.families import select_prunable_layers

    return list(select_prunable_layers(model, targets, ignore))


def masks_from_model(model: nn.Module, layer_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": weight != 0}`` (bool, True = kept) for each named layer of a sparse model.

    Raises:
        ValueError: a layer is not in the model or has no weight.
    """
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for name in layer_names:
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"pruned layer {name!r} is not a weighted module of {type(model).__name__}; does the "
                             "pruning output belong to this model?")
        masks[f"{name}.weight"] = module.weight.detach() != 0
    return masks


def local_masks(model: nn.Module, layer_names: Iterable[str]) -> "MaskedParameters":
    """The masks of a model whose weights are already sharded (FSDP2, loaded shard by shard), each rank taking
    them from its own rows: ``local weight != 0``, the same values :func:`shard_masks` cuts from full masks, with
    no full tensor anywhere.

    Raises:
        ValueError: a layer is not in the model or has no weight.
    """
    params = dict(model.named_parameters())
    paired = []
    for name in layer_names:
        key = f"{name}.weight"
        if key not in params:
            raise ValueError(f"pruned layer {name!r} is not a weighted module of {type(model).__name__}; does the "
                             "pruning output belong to this model?")
        paired.append((key, params[key], _local(params[key]).detach() != 0))
    return MaskedParameters(paired)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def shard_like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` cut the way ``param`` is: for a DTensor the local shard of ``distribute_tensor(mask, mesh,
    placements)`` (every rank holds the same full mask, so no data moves), else the mask itself."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return mask.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    sharded = distribute_tensor(mask.to(_local(param).device), mesh, param.placements, src_data_rank=None)
    local = sharded.to_local()
    if local.shape != _local(param).shape:
        raise ValueError(f"a mask shard of shape {tuple(local.shape)} does not fit its parameter shard "
                         f"{tuple(_local(param).shape)}")
    return local


@dataclass
class MaskedParameters:
    """Parameters with their (local) masks; every method acts in place on local shards only."""

    params: list[tuple[str, torch.Tensor, torch.Tensor]]   # (name, parameter, local bool mask)

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients at pruned positions (call after backward, before clipping and the step)."""
        for _, param, mask in self.params:
            if param.grad is not None:
                _local(param.grad).mul_(mask)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Multiply the weights by their masks (call after every optimizer step)."""
        for _, param, mask in self.params:
            _local(param).mul_(mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's moment buffers (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's momentum) at
        pruned positions, so no momentum can revive a pruned weight."""
        for _, param, mask in self.params:
            state = optimizer.state.get(param, {})
            for key in MOMENT_KEYS:
                buffer = state.get(key)
                if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape:
                    _local(buffer).mul_(mask)

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """``{name: count}`` of non-zero values at pruned positions of the local shards (empty when exact)."""
        bad = {}
        for name, param, mask in self.params:
            count = int((_local(param)[~mask] != 0).sum())
            if count:
                bad[name] = count
        return bad

    @torch.no_grad()
    def zero_counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (zeros, numel)}`` over the local shards (sum across ranks for the whole tensor)."""
        return {name: (int((_local(param) == 0).sum()), _local(param).numel()) for name, param, _ in self.params}

    def kept_fraction(self) -> float:
        """Fraction of kept weights over the local shards (1 − local sparsity)."""
        total = sum(mask.numel() for _, _, mask in self.params)
        return sum(int(mask.sum()) for _, _, mask in self.params) / total if total else 1.0


def shard_masks(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> MaskedParameters:
    """Pair each mask with its parameter (after ``fully_shard``: a DTensor) and cut the mask like it.

    Raises:
        ValueError: a mask names no parameter, or its shape differs from the parameter's.
    """
    missing = [name for name in masks if name not in params]
    if missing:
        raise ValueError(f"masks for {missing[:5]} name no parameter of the model (it has e.g. "
                         f"{list(params)[:5]})")
    paired = []
    for name, mask in masks.items():
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask {name} has shape {tuple(mask.shape)}, its parameter {tuple(param.shape)}")
        paired.append((name, param, shard_like(mask.bool(), param)))
    return MaskedParameters(paired)


def check_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Check that a full state dict is exactly zero wherever a mask prunes.

    Raises:
        MaskViolationError: names each tensor with non-zero pruned positions and how many.
    """
    bad = {}
    for name, mask in masks.items():
        if name not in state:
            raise MaskViolationError(f"the trained state has no tensor {name!r} to check against its mask")
        count = int((state[name].detach().cpu()[~mask.cpu()] != 0).sum())
        if count:
            bad[name] = count
    if bad:
        listing = ", ".join(f"{name}: {count}" for name, count in list(bad.items())[:8])
        raise MaskViolationError(f"pruned weights are no longer zero in {len(bad)} tensor(s) ({listing}); the "
                                 "finetuned model would not be sparse, so it is not written")
