"""Model families: which layers of a known architecture to prune by default, and how to cut it into blocks.

Why this exists: pruning a whole model needs two things per architecture that a generic walk over modules
cannot give safely.

1. *Which layers.* Every Linear or non-grouped Conv2d is prunable in principle, but the input embedding, the
   classifier and depthwise convs should stay dense, and what counts as "embedding" differs per family (a ViT's
   ``patch_embed``, an EfficientNet's ``conv_stem``, a hybrid's ResNet stem). Each family names its default
   target and ignore patterns (fnmatch on module names, the form :func:`find_prunable_layers` takes).
2. *Which blocks.* Sequential (error-propagating) pruning and the distributed engine run the model block by
   block: calibration inputs enter the first block, each block's output is the next one's input. That needs
   ``suffix(blocks[-1](...blocks[0](prefix(x)))) == model(x)`` exactly, with every prunable layer inside
   exactly one block. torch.fx is not used: timm models trace poorly (dynamic image size, register tokens,
   checkpointing branches); instead each family composes the model's *own* methods and modules
   (``VisionTransformer._pos_embed``, ``forward_head``, ...), so timm's numerics are reused rather than copied.

Block choices (units of work the pipeline schedules; names are as in ``model.named_modules()``):

- ViT / DeiT / DINOv2-style ViT: one unit per transformer block ``blocks.i``. Prefix = ``patch_embed`` ->
  ``_pos_embed`` (class / distillation / register tokens, resampled position embedding) -> ``patch_drop`` ->
  ``norm_pre``; suffix = ``norm`` -> ``forward_head``.
- ViT-CNN hybrid (timm ``HybridEmbed`` over a ResNetV2, e.g. ``vit_small_r26_s32_224``): one unit per ResNet
  bottleneck ``patch_embed.backbone.stages.i.blocks.j``, then one per ``blocks.i``. Prefix = the ResNet stem.
  The tokenisation between the CNN and the transformer (backbone norm/head, ``patch_embed.proj``, position
  embedding, ``norm_pre``) is folded into the first transformer unit, which therefore is a :class:`GluedBlock`.
  A stem-only backbone (``vit_tiny_r_s16_p8_224``) or another CNN keeps the whole ``patch_embed`` in the prefix.
- ConvNeXt: one unit per ``stages.i.blocks.j``. A stage's downsample (LayerNorm + 2x2 stride-2 conv) is folded
  into the *first* block of its stage (a :class:`GluedBlock`), so every unit maps a feature map of one
  resolution to the next unit's input and the unit count equals the block count. Prefix = ``stem``; suffix =
  ``norm_pre`` -> ``forward_head``.
- EfficientNet: one unit per ``blocks.i.j`` plus a last unit ``conv_head`` (the 1x1 head conv, a default
  target). Prefix = ``conv_stem`` -> ``bn1``; suffix = ``bn2`` -> ``forward_head``.
- MobileNetV3 (and V4, same timm class): as EfficientNet, but timm applies ``conv_head`` after global pooling,
  so the ``conv_head`` unit is ``global_pool`` -> ``conv_head`` and the suffix is the rest of ``forward_head``.

Default targets (everything else stays dense): ViT families ``blocks.*.attn.qkv``, ``blocks.*.attn.proj``,
``blocks.*.mlp.fc1``, ``blocks.*.mlp.fc2`` (DINOv2-giant's packed SwiGLU is ``mlp.fc1``/``mlp.fc2`` too); the
hybrid adds ``patch_embed.backbone.stages.*.blocks.*`` (its bottleneck convs, not the stem); ConvNeXt
``stages.*.blocks.*.mlp.fc1``/``fc2`` (the downsample conv is a per-stage patchify embedding, dense);
EfficientNet / MobileNet every non-grouped conv inside ``blocks.*`` (``conv_pw``, ``conv_pwl``, and where they
exist ``conv_exp`` / 1x1 ``ConvBnAct``) plus ``conv_head``, ignoring squeeze-excite convs (they see one pooled
row per image, so a small calibration set gives them a rank-deficient Hessian). Depthwise / grouped convs are
never candidates (no single input Hessian). Patterns that match nothing in a given variant are dropped, so the
defaults always work with :func:`find_prunable_layers`.

    blocks = split_blocks(model)                       # ModelBlocks(family="vit", prefix, blocks, suffix)
    layers = select_prunable_layers(model)             # the family's default targets
    per_block = group_layers(layers, blocks)           # [{name: layer} for each unit]
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import GluMlp, HybridEmbed, LayerScale
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cap_dist.models.spec import find_prunable_layers

Tensor = torch.Tensor
Stage = Callable[[Tensor], Tensor]


class UnsupportedModelError(ValueError):
    """The model belongs to no registered family, so there are no default targets and no block split."""


# ----------------------------------------------------------------------------------------------------
# Composition helpers


def _identity(x: Any) -> Any:
    return x


class Chain:
    """Apply callables in order; the repr names them, so a printed prefix/suffix says what it runs."""

    def __init__(self, *steps: tuple[str, Stage]) -> None:
        self.steps = tuple(steps)

    def __call__(self, x: Tensor) -> Tensor:
        for _, step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"Chain({' -> '.join(name for name, _ in self.steps) or 'identity'})"


class _SkippingView:
    """Attribute view of a module in which some children act as the identity.

    Methods fetched from the view are re-bound to the view, so a method that calls another method of the module
    (``ResNetV2.forward`` -> ``forward_features``) still sees the skipped children as identities.
    """

    __slots__ = ("_module", "_skip")

    def __init__(self, module: nn.Module, skip: frozenset[str]) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_skip", skip)

    def __getattr__(self, name: str) -> Any:
        if name in self._skip:
            return _identity
        value = getattr(self._module, name)
        if isinstance(value, types.MethodType) and value.__self__ is self._module:
            return types.MethodType(value.__func__, self)
        return value


class MethodWithout:
    """Run one of a module's own methods (e.g. ``forward_head``) with some of its children skipped.

    This is how the part of a timm method that lies *after* a block is reused instead of re-implemented: the
    children already run inside the block (``global_pool``, ``conv_head``) become identities, everything else
    (flatten, dropout in training mode, classifier, output formats) runs as timm wrote it.
    """

    def __init__(self, module: nn.Module, method: str, skip: Sequence[str]) -> None:
        if not callable(getattr(type(module), method, None)):
            raise TypeError(f"{type(module).__name__} has no method {method!r} to run")
        absent = [name for name in skip if not hasattr(module, name)]
        if absent:
            raise TypeError(f"{type(module).__name__} has no attribute(s) {absent} to skip in {method}()")
        self.module, self.method, self.skip = module, method, frozenset(skip)

    def __call__(self, x: Tensor) -> Tensor:
        return getattr(type(self.module), self.method)(_SkippingView(self.module, self.skip), x)

    def __repr__(self) -> str:
        return f"{type(self.module).__name__}.{self.method} without {sorted(self.skip)}"


class GluedBlock(nn.Module):
    """A block of the model plus the glue the model runs right before or after it.

    Used where the model has work between two blocks that belongs to no block (a ConvNeXt stage downsample, a
    hybrid ViT's tokenisation). ``core`` is the model's own block (the module named in
    :attr:`ModelBlocks.blocks`); the glue modules are registered under ``glue`` so ``parameters()`` and ``to()``
    cover them, and :attr:`glue_names` gives their names in the model. Parameters owned directly by the model
    (a ViT's ``pos_embed`` and tokens, used through ``_pos_embed``) are reached through the model: move the
    model, not single units.
    """

    def __init__(self, core: nn.Module, *, before: Sequence[tuple[str, Stage]] = (),
                 after: Sequence[tuple[str, Stage]] = (), glue: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.core = core
        glue = dict(glue or {})
        self.glue = nn.ModuleList(glue.values())
        self.glue_names: tuple[str, ...] = tuple(glue)
        self._before = Chain(*before)
        self._after = Chain(*after)

    def forward(self, x: Tensor) -> Tensor:
        return self._after(self.core(self._before(x)))

    def extra_repr(self) -> str:
        return f"before={self._before!r}, after={self._after!r}"


# ----------------------------------------------------------------------------------------------------
# Blocks


def _inside(layer_name: str, owner: str) -> bool:
    return layer_name == owner or layer_name.startswith(owner + ".")


@dataclass
class ModelBlocks:
    """A model cut into ``prefix -> blocks -> suffix`` with ``suffix(blocks[-1](...blocks[0](prefix(x))))``
    equal to ``model(x)``.

    Attributes:
        family: name of the family that produced the split.
        prefix: everything before the first block (embeddings, stems).
        blocks: ``(name, module)`` per unit, name as in ``model.named_modules()``. The module is the model's own
            submodule of that name, or a :class:`GluedBlock` whose ``core`` is.
        suffix: everything after the last block up to the model output (final norm, pooling, classifier).
        glue: unit name -> names of further model modules that unit runs (see :class:`GluedBlock`); a layer
            inside one of them belongs to that unit.
    """

    family: str
    prefix: Stage
    blocks: list[tuple[str, nn.Module]]
    suffix: Stage
    glue: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def members(self, index: int) -> tuple[str, ...]:
        """Names of the model modules unit ``index`` runs: its own name, then its glue."""
        name = self.blocks[index][0]
        return (name, *self.glue.get(name, ()))

    def run(self, x: Tensor) -> Tensor:
        """The whole composition: ``suffix(blocks[-1](...blocks[0](prefix(x))))``."""
        x = self.prefix(x)
        for _, block in self.blocks:
            x = block(x)
        return self.suffix(x)

    def block_of(self, layer_name: str) -> int:
        """Index of the unit that runs ``layer_name``; see :func:`block_of`."""
        return block_of(layer_name, self)


def block_of(layer_name: str, blocks: ModelBlocks | Sequence[tuple[str, nn.Module]]) -> int:
    """Index of the block that contains the module ``layer_name`` (a name from ``model.named_modules()``).

    With a :class:`ModelBlocks`, modules folded into a unit as glue (a ConvNeXt stage downsample, a hybrid's
    ``patch_embed.proj``) count as inside that unit; with a plain ``[(name, module), ...]`` list only the name
    prefix counts.

    Raises:
        ValueError: the layer lies in no block (it is part of the prefix or suffix, or not in the model), or,
            for a malformed list of nested blocks, in more than one.
    """
    if isinstance(blocks, ModelBlocks):
        owners = [blocks.members(i) for i in range(len(blocks))]
        names = blocks.names
    else:
        names = [name for name, _ in blocks]
        owners = [(name,) for name in names]
    found = [i for i, members in enumerate(owners) if any(_inside(layer_name, m) for m in members)]
    if len(found) == 1:
        return found[0]
    if not found:
        span = f"{names[0]!r} .. {names[-1]!r}" if names else "none"
        raise ValueError(f"layer {layer_name!r} lies in no block (blocks: {len(names)}, {span}); embeddings, "
                         "stems and heads belong to the prefix or suffix, which are not blocks")
    raise ValueError(f"layer {layer_name!r} lies in several blocks {[names[i] for i in found]}; blocks must not "
                     "nest")


def check_split(model: nn.Module, blocks: ModelBlocks, x: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Check on a real input that the composition reproduces ``model(x)`` (run in eval mode, no grad).

    A cheap guard for models the families only recognise by class: a subclass that changes its forward in a
    way the splitter does not know fails here instead of silently calibrating on the wrong activations.

    Raises:
        ValueError: the outputs differ beyond the tolerances (the message gives the largest difference).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, got = model(x), blocks.run(x)
    finally:
        model.train(was_training)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise ValueError(f"the {blocks.family!r} block split of {type(model).__name__} does not reproduce its "
                         f"forward (output shapes {tuple(got.shape)} vs {tuple(expected.shape)}, largest difference "
                         f"{diff:.3g}); the model's forward differs from what the family expects")


def group_layers(layers: Mapping[str, nn.Module], blocks: ModelBlocks) -> list[dict[str, nn.Module]]:
    """Split ``{name: layer}`` (e.g. from :func:`select_prunable_layers`) into one dict per unit, in unit order.

    Raises:
        ValueError: a layer lies in no block (see :func:`block_of`).
    """
    grouped: list[dict[str, nn.Module]] = [{} for _ in blocks.blocks]
    for name, layer in layers.items():
        grouped[block_of(name, blocks)][name] = layer
    return grouped


def _expect(model: nn.Module, cls: type[nn.Module]) -> None:
    if not isinstance(model, cls):
        raise TypeError(f"this splitter handles timm {cls.__name__} models, got {type(model).__name__}; "
                        "use split_blocks(model), which picks the family")


def _children(parent: nn.Module, parent_name: str) -> list[tuple[str, nn.Module]]:
    return [(f"{parent_name}.{name}", child) for name, child in parent.named_children()]


def _present(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for those direct children of ``model`` that exist and are modules."""
    return [(name, getattr(model, name)) for name in names if isinstance(getattr(model, name, None), nn.Module)]


# ---- ViT families


def _vit_token_steps(model: VisionTransformer) -> list[tuple[str, Stage]]:
    """What ``VisionTransformer.forward_features`` runs between ``patch_embed`` and the blocks."""
    return [("_pos_embed", model._pos_embed), *_present(model, ("patch_drop", "norm_pre"))]


def _vit_glue_modules(model: VisionTransformer) -> list[tuple[str, nn.Module]]:
    return _present(model, ("pos_drop", "patch_drop", "norm_pre"))


def _transformer_blocks(model: VisionTransformer) -> list[tuple[str, nn.Module]]:
    blocks = _children(model.blocks, "blocks")
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (depth 0); nothing to split")
    return blocks


def _vit_suffix(model: VisionTransformer) -> Chain:
    return Chain(("norm", model.norm), ("forward_head", model.forward_head))


def _split_vit(model: nn.Module, family: str = "vit") -> ModelBlocks:
    _expect(model, VisionTransformer)
    prefix = Chain(("patch_embed", model.patch_embed), *_vit_token_steps(model))
    return ModelBlocks(family, prefix, _transformer_blocks(model), _vit_suffix(model))


def _split_dinov2(model: nn.Module) -> ModelBlocks:
    return _split_vit(model, family="dinov2")


def _resnet_stage_blocks(backbone: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    units: list[tuple[str, nn.Module]] = []
    for stage_name, stage in _children(backbone.stages, f"{name}.stages"):
        units += _children(stage.blocks, f"{stage_name}.blocks")
    return units


def _split_vit_hybrid(model: nn.Module) -> ModelBlocks:
    _expect(model, VisionTransformer)
    embed = model.patch_embed
    backbone = getattr(embed, "backbone", None)
    vit_units = _transformer_blocks(model)
    cnn_units = _resnet_stage_blocks(backbone, "patch_embed.backbone") if isinstance(backbone, ResNetV2) else []
    if not cnn_units:  # stem-only backbone (vit_tiny_r_s16_p8) or a CNN we do not split: it is the embedding
        prefix = Chain(("patch_embed", embed), *_vit_token_steps(model))
        return ModelBlocks("vit_hybrid", prefix, vit_units, _vit_suffix(model))
    skipped_backbone = ("stem", "stages")
    backbone_tail = MethodWithout(backbone, "forward", skipped_backbone)
    embed_tail = MethodWithout(embed, "forward", ("backbone",))
    glue = {f"patch_embed.backbone.{n}": m for n, m in backbone.named_children() if n not in skipped_backbone}
    glue |= {f"patch_embed.{n}": m for n, m in embed.named_children() if n != "backbone"}
    glue |= dict(_vit_glue_modules(model))
    first_name, first = vit_units[0]
    vit_units[0] = (first_name, GluedBlock(
        first, before=[("backbone tail", backbone_tail), ("patch_embed tail", embed_tail),
                       *_vit_token_steps(model)], glue=glue))
    return ModelBlocks("vit_hybrid", Chain(("patch_embed.backbone.stem", backbone.stem)), cnn_units + vit_units,
                       _vit_suffix(model), glue={first_name: tuple(glue)})


# ---- ConvNeXt


def _split_convnext(model: nn.Module) -> ModelBlocks:
    _expect(model, ConvNeXt)
    units: list[tuple[str, nn.Module]] = []
    glue_names: dict[str, tuple[str, ...]] = {}
    pending: list[tuple[str, nn.Module]] = []  # downsamples not yet folded into a block
    for stage_name, stage in _children(model.stages, "stages"):
        downsample = getattr(stage, "downsample", None)
        if isinstance(downsample, nn.Module) and not isinstance(downsample, nn.Identity):
            pending.append((f"{stage_name}.downsample", downsample))
        for block_name, block in _children(stage.blocks, f"{stage_name}.blocks"):
            if pending:
                glued = dict(pending)
                block = GluedBlock(block, before=list(pending), glue=glued)
                glue_names[block_name] = tuple(glued)
                pending = []
            units.append((block_name, block))
    if not units:
        raise ValueError("ConvNeXt has no blocks (all depths 0); nothing to split")
    suffix = Chain(*pending, *_present(model, ("norm_pre",)), ("forward_head", model.forward_head))
    return ModelBlocks("convnext", Chain(("stem", model.stem)), units, suffix, glue=glue_names)


# ---- EfficientNet / MobileNetV3


def _mbconv_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units: list[tuple[str, nn.Module]] = []
    for stage_name, stage in _children(model.blocks, "blocks"):
        # timm builds every stage as a Sequential of blocks; a bare block would be a unit of its own
        units += _children(stage, stage_name) if isinstance(stage, nn.Sequential) else [(stage_name, stage)]
    if not units:
        raise ValueError(f"{type(model).__name__} has no blocks; nothing to split")
    return units


def _split_efficientnet(model: nn.Module) -> ModelBlocks:
    _expect(model, EfficientNet)
    units = _mbconv_units(model)
    prefix = Chain(("conv_stem", model.conv_stem), ("bn1", model.bn1))
    if isinstance(model.conv_head, nn.Conv2d):
        units.append(("conv_head", model.conv_head))
        suffix = Chain(("bn2", model.bn2), ("forward_head", model.forward_head))
    else:  # head conv removed (e.g. by prune_intermediate_layers): nothing prunable after the blocks
        suffix = Chain(("conv_head", model.conv_head), ("bn2", model.bn2), ("forward_head", model.forward_head))
    return ModelBlocks("efficientnet", prefix, units, suffix)


def _split_mobilenetv3(model: nn.Module) -> ModelBlocks:
    _expect(model, MobileNetV3)
    units = _mbconv_units(model)
    prefix = Chain(("conv_stem", model.conv_stem), ("bn1", model.bn1))
    glue: dict[str, tuple[str, ...]] = {}
    if isinstance(model.conv_head, nn.Conv2d):
        # timm pools *before* the head conv, so the unit is pool -> conv_head; the rest of forward_head follows
        units.append(("conv_head", GluedBlock(model.conv_head, before=[("global_pool", model.global_pool)],
                                              glue={"global_pool": model.global_pool})))
        glue["conv_head"] = ("global_pool",)
        suffix: Stage = MethodWithout(model, "forward_head", ("global_pool", "conv_head"))
    else:
        suffix = model.forward_head
    return ModelBlocks("mobilenetv3", prefix, units, suffix, glue=glue)


# ----------------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class ModelFamily:
    """An architecture family: how to recognise it, what to prune by default, how to cut it into blocks.

    Attributes:
        name: short identifier (``"vit"``, ``"convnext"``, ...).
        description: what it covers, shown in errors.
        matches: predicate on the model instance (by timm class and options).
        targets: default fnmatch patterns of layers to prune (``find_prunable_layers``'s ``targets``).
        ignore: default fnmatch patterns of layers to keep dense among the targets.
        splitter: builds the :class:`ModelBlocks`.
    """

    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    splitter: Callable[[nn.Module], ModelBlocks]

    def layer_patterns(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """The default ``(targets, ignore)`` restricted to patterns that match something in ``model``.

        Variants differ (a hybrid without backbone stages, an EfficientNet without squeeze-excite), and
        :func:`find_prunable_layers` rejects patterns that match nothing, so those are dropped here.

        Raises:
            ValueError: none of the family's target patterns matches a prunable layer of ``model``.
        """
        prunable = [name for name, m in model.named_modules()
                    if name and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]
        targets = [p for p in self.targets if any(_matches(n, p) for n in prunable)]
        if not targets:
            raise ValueError(f"{type(model).__name__} was recognised as family {self.name!r}, but none of its "
                             f"default targets {list(self.targets)} matches a Linear or non-grouped Conv2d "
                             "layer; pass targets explicitly")
        ignore = [p for p in self.ignore if any(_matches(n, p) for n in prunable)]  # only those that drop a layer
        return targets, ignore


def _matches(name: str, pattern: str) -> bool:
    """Same rule as :func:`find_prunable_layers`: the name or the name of a containing module matches."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _is_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def _is_vit_hybrid(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer) and isinstance(model.patch_embed, HybridEmbed)


def _is_swiglu_packed(module: nn.Module) -> bool:
    """timm's ``SwiGLUPacked`` is ``partial(GluMlp, act_layer=nn.SiLU, gate_last=False)``, not a class."""
    return (isinstance(module, GluMlp) and not getattr(module, "gate_last", True)
            and isinstance(getattr(module, "act", None), nn.SiLU))


def _is_dinov2(model: nn.Module) -> bool:
    """DINOv2-style: register tokens, a packed SwiGLU MLP, or LayerScale with 14-pixel patches (DINOv2's
    patch size; DeiT-III also uses LayerScale, but with 16-pixel patches, and stays plain "vit")."""
    if not isinstance(model, VisionTransformer):
        return False
    if getattr(model, "reg_token", None) is not None:
        return True
    modules = list(model.blocks.modules())
    if any(_is_swiglu_packed(m) for m in modules):
        return True
    patch = getattr(model.patch_embed, "patch_size", None)
    return any(isinstance(m, LayerScale) for m in modules) and tuple(patch or ()) == (14, 14)


_VIT_TARGETS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
_MBCONV_TARGETS = ("blocks.*", "conv_head")
_MBCONV_IGNORE = ("blocks.*.se",)

_FAMILIES: list[ModelFamily] = [
    ModelFamily("vit_hybrid", "ViT-CNN hybrid: timm VisionTransformer with a HybridEmbed ResNetV2 backbone "
                "(vit_small_r26_s32_224, vit_tiny_r_s16_p8_224)", _is_vit_hybrid,
                _VIT_TARGETS + ("patch_embed.backbone.stages.*.blocks.*",), (), _split_vit_hybrid),
    ModelFamily("dinov2", "DINOv2-style ViT: timm VisionTransformer with register tokens, SwiGLUPacked MLP or "
                "LayerScale at patch 14 (vit_small_patch14_reg4_dinov2, vit_giant_patch14_dinov2)", _is_dinov2,
                _VIT_TARGETS, (), _split_dinov2),
    ModelFamily("vit", "ViT / DeiT: timm VisionTransformer (vit_base_patch16_224, deit_small_patch16_224)",
                _is_vit, _VIT_TARGETS, (), _split_vit),
    ModelFamily("convnext", "ConvNeXt: timm ConvNeXt (convnext_tiny, convnextv2_*)",
                lambda m: isinstance(m, ConvNeXt), ("stages.*.blocks.*.mlp.fc1", "stages.*.blocks.*.mlp.fc2"), (),
                _split_convnext),
    ModelFamily("efficientnet", "EfficientNet: timm EfficientNet (tf_efficientnet_lite0, efficientnet_b0)",
                lambda m: isinstance(m, EfficientNet), _MBCONV_TARGETS, _MBCONV_IGNORE, _split_efficientnet),
    ModelFamily("mobilenetv3", "MobileNet: timm MobileNetV3 (mobilenetv3_large_100, mobilenetv4_conv_small)",
                lambda m: isinstance(m, MobileNetV3), _MBCONV_TARGETS, _MBCONV_IGNORE, _split_mobilenetv3),
]


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in detection order (the first whose predicate holds wins)."""
    return tuple(_FAMILIES)


def register_family(family: ModelFamily) -> None:
    """Add a family, checked before the built-in ones (so it can refine one); replaces one of the same name."""
    _FAMILIES[:] = [family] + [f for f in _FAMILIES if f.name != family.name]


def _supported() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in _FAMILIES)


def detect_family(model: nn.Module) -> ModelFamily:
    """The first registered family whose predicate accepts ``model``.

    Raises:
        UnsupportedModelError: no family matches; the message lists the supported families.
    """
    for family in _FAMILIES:
        if family.matches(model):
            return family
    raise UnsupportedModelError(f"{type(model).__module__}.{type(model).__name__} belongs to no supported model "
                                f"family, so it has no default prunable layers or block split. Supported: "
                                f"{_supported()}. Pass explicit targets (fnmatch patterns on module names) to "
                                "choose its layers.")


def default_layer_patterns(model: nn.Module) -> tuple[list[str], list[str]]:
    """The model family's default ``(targets, ignore)`` patterns, restricted to those present in ``model``."""
    return detect_family(model).layer_patterns(model)


def select_prunable_layers(model: nn.Module, targets: Sequence[str] | None = None,
                           ignore: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers to prune: explicit ``targets`` for any model, else the model family's defaults.

    Args:
        model: the module to search.
        targets: fnmatch patterns (see :func:`find_prunable_layers`); with them, no family is needed.
        ignore: patterns to keep dense; added to the family's default ignore patterns when ``targets`` is None.

    Raises:
        UnsupportedModelError: ``targets`` is None and the model belongs to no family.
        ValueError: a pattern matches nothing, or nothing is left to prune.
    """
    if targets is not None:
        return find_prunable_layers(model, targets, ignore)
    family_targets, family_ignore = default_layer_patterns(model)
    return find_prunable_layers(model, family_targets, family_ignore + list(ignore or []) or None)


def split_blocks(model: nn.Module) -> ModelBlocks:
    """Cut ``model`` into ``prefix -> blocks -> suffix`` per its family (see the module docstring).

    In eval mode ``split.run(x)`` equals ``model(x)``; the blocks hold the model's own modules (shared, not
    copied), so hooks and weight edits on the model's layers act inside the blocks.

    Raises:
        UnsupportedModelError: the model belongs to no family.
    """
    return detect_family(model).splitter(model)


__all__ = [
    "Chain",
    "GluedBlock",
    "MethodWithout",
    "ModelBlocks",
    "ModelFamily",
    "UnsupportedModelError",
    "block_of",
    "check_split",
    "default_layer_patterns",
    "detect_family",
    "families",
    "group_layers",
    "register_family",
    "select_prunable_layers",
    "split_blocks",
]
