"""The removable structures of timm models, and how to remove them physically.

A structure is a set of equal groups inside one module, each group feeding a fixed set of input columns of one
consumer layer and nothing else:

* ``mlp``: a hidden unit of timm's ``Mlp`` (row of ``fc1``, column of ``fc2``), ``GluMlp`` / ``SwiGLUPacked`` (the
  two packed rows ``j`` and ``j + hidden`` of ``fc1``, column ``j`` of ``fc2``) or ``SwiGLU`` (rows of ``fc1_g`` and
  ``fc1_x``); ConvNeXt-style 1×1-conv MLPs included.
* ``heads``: an attention head of timm's ``Attention`` (its q, k, v rows of ``qkv``, ``head_dim`` columns of
  ``proj``, its rows of the optional ``gate``); ``num_heads`` and ``attn_dim`` follow, so timm's own forward runs.
* ``channels``: an expansion channel of an EfficientNet/MobileNet ``InvertedResidual`` (output channel of
  ``conv_pw``, its ``bn1`` row, the depthwise ``conv_dw`` channel and its ``bn2`` row, input channel of
  ``conv_pwl``).

Removal keeps every module's class (timm's modules with smaller tensors), so the reduced model is plain timm and
its shapes are a small record (:func:`structure_shapes`) that :func:`apply_structure_shapes` re-applies to a
freshly built skeleton before its weights are loaded (``model.json``'s ``structured`` key).

    found = find_structures(model, ("mlp", "heads"))
    remove_groups(model, found[0], keep=torch.tensor([0, 2, 3]))   # a physically smaller block

A whole residual branch can go too (every head of an attention, every hidden unit of an MLP, in a pre-norm timm
``Block``): :func:`remove_branch` puts a :class:`ConstantBranch` (the branch's mean output, a trainable vector) in
the module's place and an ``Identity`` in its norm's, so neither runs; the record says ``groups: 0``. At batch 1 a
small ViT's time is mostly per-call overhead that a narrower module keeps and only a removed call saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models.vision_transformer import Block
from torch import nn

StructureKind = Literal["mlp", "heads", "channels"]
STRUCTURE_KINDS: tuple[StructureKind, ...] = ("mlp", "heads", "channels")


class StructureError(ValueError):
    """A module cannot have its structures removed exactly (e.g. a norm that mixes the groups)."""


@dataclass(frozen=True)
class Structure:
    """One module's removable groups.

    Attributes:
        name: the module holding them (``blocks.0.mlp``).
        kind: ``mlp``, ``heads`` or ``channels``.
        consumer: the layer whose input columns the groups feed (``blocks.0.mlp.fc2``): its input Hessian is the
            curvature of the group OBS.
        groups: how many groups the module has now.
        group_size: the consumer's flattened input columns per group (``head_dim`` for heads; kh·kw for a conv).
    """

    name: str
    kind: StructureKind
    consumer: str
    groups: int
    group_size: int

    def columns(self) -> torch.Tensor:
        """``[groups, group_size]`` consumer column ids of each group (contiguous)."""
        return torch.arange(self.groups * self.group_size, device="cpu").reshape(self.groups, self.group_size)


def _conv_cols(layer: nn.Module) -> int:
    return int(layer.kernel_size[0] * layer.kernel_size[1]) if isinstance(layer, nn.Conv2d) else 1


def structure_of(name: str, module: nn.Module) -> Structure | None:
    """The structure ``module`` holds, None for modules that hold none; refuses variants it cannot prune exactly."""
    if isinstance(module, (Mlp, GluMlp, SwiGLU)):
        if not isinstance(module.norm, nn.Identity):
            raise StructureError(f"{name}: {type(module).__name__} normalises its hidden units "
                                 f"({type(module.norm).__name__}), so removing one changes the others; exclude "
                                 "'mlp' from structured.structures for this model")
        return Structure(name, "mlp", f"{name}.fc2", _hidden_of(module), _conv_cols(module.fc2))
    if isinstance(module, Attention):
        if not isinstance(module.norm, nn.Identity):
            raise StructureError(f"{name}: the attention output is normalised across heads "
                                 f"({type(module.norm).__name__}); exclude 'heads' from structured.structures")
        return Structure(name, "heads", f"{name}.proj", module.num_heads, module.head_dim)
    if isinstance(module, InvertedResidual):
        mid = module.conv_pw.out_channels
        if module.conv_s2d is not None or not isinstance(module.aa, nn.Identity) \
                or not isinstance(module.se, nn.Identity) or module.conv_dw.groups != mid:
            raise StructureError(f"{name}: this InvertedResidual mixes its expansion channels (squeeze-excite, "
                                 "grouped conv, anti-aliasing or space-to-depth), so a channel cannot be removed "
                                 "exactly; exclude 'channels' from structured.structures")
        return Structure(name, "channels", f"{name}.conv_pwl", mid, _conv_cols(module.conv_pwl))
    return None


def _hidden_of(mlp: nn.Module) -> int:
    return _in_width(mlp.fc2)


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def find_structures(model: nn.Module, kinds: tuple[str, ...] = STRUCTURE_KINDS,
                    ignore: tuple[str, ...] = ()) -> list[Structure]:
    """Every structure of the given kinds in module order (modules named in ``ignore`` and their children left out).

    Raises:
        ValueError: an unknown kind, or no structure of the kinds in the model.
        StructureError: a module of a requested kind that cannot be pruned exactly.
    """
    unknown = set(kinds) - set(STRUCTURE_KINDS)
    if unknown:
        raise ValueError(f"unknown structure kind(s) {sorted(unknown)}; choose from {', '.join(STRUCTURE_KINDS)}")
    found = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in ignore):
            continue
        kind = _kind_of(module)
        if kind in kinds:
            structure = structure_of(name, module)
            if structure is not None:
                found.append(structure)
    if not found:
        raise ValueError(f"{type(model).__name__} has no {'/'.join(kinds)} structures that cap-dist can remove "
                         "(timm Mlp/GluMlp/SwiGLU, Attention, InvertedResidual)")
    return found


def _kind_of(module: nn.Module) -> str | None:
    if isinstance(module, (Mlp, GluMlp, SwiGLU)):
        return "mlp"
    if isinstance(module, Attention):
        return "heads"
    if isinstance(module, InvertedResidual):
        return "channels"
    return None


# ----------------------------------------------------------------------------------------------------
# Physical removal: the module keeps its class, its tensors shrink.


def _slice_param(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    tensor = getattr(module, attr)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attr, sliced)          # a registered buffer stays a buffer


def _keep_outputs(layer: nn.Module, index: torch.Tensor) -> None:
    """Keep the output rows ``index`` of a Linear or Conv2d (a depthwise conv keeps the same input channels)."""
    _slice_param(layer, "weight", 0, index)
    _slice_param(layer, "bias", 0, index)
    if isinstance(layer, nn.Conv2d):
        if layer.groups == layer.out_channels and layer.groups == layer.in_channels and layer.groups > 1:
            layer.in_channels = layer.groups = int(index.numel())
        layer.out_channels = int(index.numel())
    else:
        layer.out_features = int(index.numel())


def _keep_inputs(layer: nn.Module, index: torch.Tensor) -> None:
    """Keep the input channels/features ``index`` of a Linear or non-grouped Conv2d."""
    _slice_param(layer, "weight", 1, index)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = int(index.numel())
    else:
        layer.in_features = int(index.numel())


def _keep_batchnorm(bn: nn.BatchNorm2d, index: torch.Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(bn, attr, 0, index)
    bn.num_features = int(index.numel())


def remove_groups(model: nn.Module, structure: Structure, keep: torch.Tensor) -> Structure:
    """Shrink the structure's module to the groups ``keep`` (ascending group ids), in place; returns the new
    :class:`Structure`. The consumer keeps its columns of those groups as they are: write its updated weight first."""
    keep = torch.as_tensor(keep, dtype=torch.long, device="cpu").sort().values
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= structure.groups:
        raise ValueError(f"{structure.name}: keep must name 1..{structure.groups} of its groups, got "
                         f"{keep.tolist()[:8]}")
    module = model.get_submodule(structure.name)
    if structure.kind == "mlp":
        _shrink_mlp(module, keep, structure.groups)
    elif structure.kind == "heads":
        _shrink_attention(module, keep)
    else:
        _keep_outputs(module.conv_pw, keep)
        _keep_batchnorm(module.bn1, keep)
        _keep_outputs(module.conv_dw, keep)
        _keep_batchnorm(module.bn2, keep)
        _keep_inputs(module.conv_pwl, keep)
    return Structure(structure.name, structure.kind, structure.consumer, int(keep.numel()), structure.group_size)


def _shrink_mlp(mlp: nn.Module, keep: torch.Tensor, hidden: int) -> None:
    if isinstance(mlp, SwiGLU):
        _keep_outputs(mlp.fc1_g, keep)
        _keep_outputs(mlp.fc1_x, keep)
    elif isinstance(mlp, GluMlp):                  # packed halves: [value | gate] rows j and j + hidden
        _keep_outputs(mlp.fc1, torch.cat([keep, keep + hidden]))
    else:
        _keep_outputs(mlp.fc1, keep)
    _keep_inputs(mlp.fc2, keep)


def _shrink_attention(attn: Attention, keep: torch.Tensor) -> None:
    hd = attn.head_dim
    per_head = (keep[:, None] * hd + torch.arange(hd, device="cpu")).reshape(-1)   # the heads' attn-dim columns
    rows = torch.cat([per_head + part * attn.attn_dim for part in range(3)])  # its q, k and v rows of qkv
    _keep_outputs(attn.qkv, rows)
    if attn.gate is not None:
        _keep_outputs(attn.gate, per_head)
    _keep_inputs(attn.proj, per_head)
    attn.num_heads = int(keep.numel())
    attn.attn_dim = attn.num_heads * hd


# ----------------------------------------------------------------------------------------------------
# Whole branches: the module and its norm replaced by a constant


class ConstantBranch(nn.Module):
    """A removed residual branch: returns its ``constant`` (the branch's mean output on the calibration images, a
    trainable vector) broadcast to the branch input's shape, whatever else the block passes it. ``kind`` records
    what was removed (``mlp`` or ``heads``) for the output's shapes record."""

    def __init__(self, constant: torch.Tensor, kind: StructureKind) -> None:
        super().__init__()
        self.constant = nn.Parameter(constant.detach().clone())
        self.kind = kind

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.constant.to(x.dtype).expand_as(x)

    def extra_repr(self) -> str:
        return f"{self.kind}, width={self.constant.numel()}"


_BRANCH_NORMS = {"attn": "norm1", "mlp": "norm2"}


def branch_norm(model: nn.Module, name: str) -> str | None:
    """The norm that feeds the module ``name`` alone, when the module is a whole residual branch that can be
    replaced by a constant (``attn`` or ``mlp`` of a pre-norm timm ``Block``: ``x + ls(module(norm(x)))``); None
    elsewhere (an EfficientNet block, a post-norm or parallel block, where a constant would change more)."""
    parent_name, _, attr = name.rpartition(".")
    if attr not in _BRANCH_NORMS:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    if type(parent) is not Block:
        return None
    return f"{parent_name}.{_BRANCH_NORMS[attr]}" if parent_name else _BRANCH_NORMS[attr]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def remove_branch(model: nn.Module, structure: Structure, constant: torch.Tensor) -> None:
    """Replace the structure's module by ``ConstantBranch(constant)`` and its norm by ``Identity``, in place.

    Raises:
        StructureError: the module is not a whole residual branch (see :func:`branch_norm`).
    """
    norm = branch_norm(model, structure.name)
    if norm is None:
        raise StructureError(f"{structure.name}: only the attn / mlp of a pre-norm timm Block can be removed whole "
                             "(a constant there is exact); keep at least one group")
    consumer = model.get_submodule(structure.consumer)
    outputs = consumer.out_channels if isinstance(consumer, nn.Conv2d) else consumer.out_features
    if tuple(constant.shape) != (outputs,):
        raise ValueError(f"{structure.name}: the constant must have the branch's {outputs} outputs, got "
                         f"{tuple(constant.shape)}")
    weight = consumer.weight
    _set(model, structure.name, ConstantBranch(constant.to(device=weight.device, dtype=weight.dtype),
                                               structure.kind))
    _set(model, norm, nn.Identity())


def removed_branches(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shapes record of every removed branch in ``model`` (``groups: 0``)."""
    return {name: {"kind": m.kind, "groups": 0} for name, m in model.named_modules() if isinstance(m, ConstantBranch)}


# ----------------------------------------------------------------------------------------------------
# The shapes record (model.json's ``structured``)


def structure_shapes(structures: list[Structure]) -> dict[str, dict[str, Any]]:
    """``{module name: {"kind": ..., "groups": n}}``: what a rebuilt skeleton must be shrunk to."""
    return {s.name: {"kind": s.kind, "groups": s.groups} for s in structures}


def apply_structure_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Shrink a freshly built model to the recorded shapes (the first groups kept; the weights loaded afterwards
    fill them). A module already at its recorded size is left alone, so applying twice is harmless.

    Raises:
        StructureError: the record names a module the model lacks, of another kind, or larger than it.
    """
    if not isinstance(shapes, dict):
        raise StructureError(f"model.json 'structured' must map module names to {{'kind', 'groups'}}, got "
                             f"{type(shapes).__name__}")
    for name, entry in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise StructureError(f"model.json 'structured' names {name!r}, which this model does not have") from None
        if isinstance(module, ConstantBranch) and isinstance(entry, dict) and entry.get("kind") == module.kind \
                and entry.get("groups") == 0:
            continue                                   # already removed
        structure = structure_of(name, module)
        if structure is None or not isinstance(entry, dict) or entry.get("kind") != structure.kind:
            raise StructureError(f"model.json 'structured' says {name!r} is {entry!r}, but the model's module there "
                                 f"is a {type(module).__name__}")
        groups = entry.get("groups")
        if groups == 0 and branch_norm(model, name) is not None:
            outputs = model.get_submodule(structure.consumer)
            width = outputs.out_channels if isinstance(outputs, nn.Conv2d) else outputs.out_features
            remove_branch(model, structure, torch.zeros(width))   # the loaded weights fill the constant
            continue
        if not isinstance(groups, int) or not 1 <= groups <= structure.groups:
            least = 0 if branch_norm(model, name) is not None else 1
            raise StructureError(f"model.json 'structured': {name!r} groups={groups!r} must be an integer in "
                                 f"[{least}, {structure.groups}]")
        if groups < structure.groups:
            remove_groups(model, structure, torch.arange(groups, device="cpu"))


def infer_structure_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The shapes record of a state dict whose structures are smaller than ``model``'s (meta is fine): every
    supported structure whose consumer has fewer input columns in ``state``. Modules that hold no removable
    structure (or a variant that cannot be pruned exactly) are not recorded; a removed branch (its ``constant`` in
    the state, its consumer's weight not) is recorded as ``groups: 0``; a state that differs from the model
    elsewhere fails when it is loaded, with the key named."""
    shapes = {}
    for name, module in model.named_modules():
        if _kind_of(module) is None:
            continue
        try:
            structure = structure_of(name, module)
        except StructureError:
            continue
        if f"{name}.constant" in state and f"{structure.consumer}.weight" not in state:
            shapes[name] = {"kind": structure.kind, "groups": 0}       # a removed branch
            continue
        weight = state.get(f"{structure.consumer}.weight")
        if weight is None or weight.ndim < 2:
            continue
        columns = int(weight.shape[1]) * (int(weight.shape[2] * weight.shape[3]) if weight.ndim == 4 else 1)
        groups, rest = divmod(columns, structure.group_size)
        if rest == 0 and 1 <= groups < structure.groups:
            shapes[name] = {"kind": structure.kind, "groups": groups}
    return shapes
