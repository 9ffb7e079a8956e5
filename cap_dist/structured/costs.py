"""What removing one group saves: multiply-accumulates per image (from the shapes a probe forward pass sees) and
parameters, and the same totals for the whole model, so a target ``keep 60 % of the compute`` becomes a number of
MACs to remove.

MACs count every Linear and Conv2d (out · in/groups · kh · kw per output position) plus attention's two matmuls
(2 · N² · attn_dim per image); norms, activations and softmax are left out (small, and fused by runtimes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from timm.layers import Attention
from torch import nn

from cap_dist.models.structures import Structure, remove_groups


@dataclass(frozen=True)
class GroupCost:
    """What one group of a structure costs per image (MACs) and in parameters."""

    macs: float
    params: int


def module_macs(model: nn.Module, sample: torch.Tensor) -> dict[str, float]:
    """MACs per image of every Linear, Conv2d and Attention (its two matmuls) from one forward pass of ``sample``."""
    macs: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, Attention)):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                per_image = out.numel() / out.shape[0]
                if isinstance(mod, nn.Linear):
                    macs[name] = macs.get(name, 0.0) + per_image * mod.in_features
                elif isinstance(mod, nn.Conv2d):
                    kh, kw = mod.kernel_size
                    macs[name] = macs.get(name, 0.0) + per_image * mod.in_channels // mod.groups * kh * kw
                else:
                    tokens = args[0].shape[1]
                    macs[name] = macs.get(name, 0.0) + 2.0 * tokens * tokens * mod.attn_dim

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())




def group_costs(model: nn.Module, structures: list[Structure], macs: dict[str, float]) -> dict[str, GroupCost]:
    """Per structure: the MACs and parameters one group accounts for. Every MAC counted inside the structure's
    module scales with its groups (producer rows, consumer columns, attention matmuls), so one group is the module's
    MACs over its groups; the parameters are counted by removing one group from a meta-device copy."""
    costs = {}
    for s in structures:
        module = model.get_submodule(s.name)
        prefix = s.name + "."
        own = sum(v for k, v in macs.items() if k == s.name or k.startswith(prefix))
        probe = copy.deepcopy(module).to("meta")
        before = total_params(probe)
        remove_groups(probe, replace(s, name=""), torch.arange(s.groups - 1, device="cpu"))
        costs[s.name] = GroupCost(macs=own / s.groups, params=before - total_params(probe))
    return costs
