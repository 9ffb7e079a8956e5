"""Model families: default prunable layers and the block split, on tiny random instances of every family.

The split's contract is what sequential and distributed pruning rely on: composing prefix, blocks and suffix
reproduces ``model(x)``, and every default target runs inside exactly the block ``block_of`` names.
"""

from __future__ import annotations

import re
from functools import partial

import pytest
import timm
import torch
from timm.layers import GluMlp, GroupNormAct, HybridEmbed, StdConv2dSame, SwiGLUPacked
from timm.models.convnext import ConvNeXt
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cap_dist.models import (
    GluedBlock,
    ModelBlocks,
    UnsupportedModelError,
    block_of,
    check_split,
    default_layer_patterns,
    detect_family,
    find_prunable_layers,
    group_layers,
    select_prunable_layers,
    split_blocks,
)

VIT = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and norm statistic, so no block is an identity (LayerScale 1e-5, zero heads)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # noise at each tensor's own scale keeps activations finite
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(0.5 * scale * torch.randn(p.shape, generator=generator))
            if name.endswith(("gamma", "ls1.gamma", "ls2.gamma")):
                p.abs_().add_(0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
    return model.eval()


def _vit() -> nn.Module:
    return VisionTransformer(img_size=32, patch_size=8, **VIT)


def _deit_distilled() -> nn.Module:
    return VisionTransformerDistilled(img_size=32, patch_size=8, **VIT)


def _dinov2_reg4() -> nn.Module:  # vit_small_patch14_reg4_dinov2's options, tiny
    return VisionTransformer(img_size=56, patch_size=14, init_values=1e-5, reg_tokens=4, no_embed_class=True,
                             dynamic_img_size=True, **VIT)


def _dinov2_giant_like() -> nn.Module:  # vit_giant_patch14_dinov2's options (packed SwiGLU), tiny
    return VisionTransformer(img_size=56, patch_size=14, init_values=1e-5, mlp_ratio=2.66667 * 2,
                             mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, dynamic_img_size=True, **VIT)


def _hybrid_r26_like() -> nn.Module:  # vit_small_r26_s32_224's structure: ResNetV2 bottlenecks + ViT, tiny
    backbone = ResNetV2(layers=(1, 2), channels=(32, 64), num_classes=0, global_pool="", preact=False,
                        stem_type="same", stem_chs=16, conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=8))
    return VisionTransformer(img_size=64, patch_size=1, embed_layer=partial(HybridEmbed, backbone=backbone), **VIT)


def _hybrid_stem_only() -> nn.Module:
    return timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, **VIT)


def _convnext() -> nn.Module:
    return ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 16, 32), num_classes=10)


def _convnext_conv_mlp() -> nn.Module:
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), num_classes=10, conv_mlp=True)


def _lite0() -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)


def _efficientnet_b0() -> nn.Module:
    return timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)


def _mobilenetv3() -> nn.Module:
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)


# (builder, family, input size)
CASES = {
    "vit": (_vit, "vit", 32),
    "deit_distilled": (_deit_distilled, "vit", 32),
    "dinov2_reg4": (_dinov2_reg4, "dinov2", 56),
    "dinov2_giant_like": (_dinov2_giant_like, "dinov2", 56),
    "hybrid_r26_like": (_hybrid_r26_like, "vit_hybrid", 64),
    "hybrid_stem_only": (_hybrid_stem_only, "vit_hybrid", 64),
    "convnext": (_convnext, "convnext", 32),
    "convnext_conv_mlp": (_convnext_conv_mlp, "convnext", 32),
    "tf_efficientnet_lite0": (_lite0, "efficientnet", 64),
    "efficientnet_b0": (_efficientnet_b0, "efficientnet", 64),
    "mobilenetv3": (_mobilenetv3, "mobilenetv3", 64),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, str, int]:
    build, family, size = CASES[request.param]
    torch.manual_seed(0)
    return request.param, _randomise(build()), family, size


def _inputs(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_family_detected(case: tuple[str, nn.Module, str, int]) -> None:
    _, model, family, _ = case
    assert detect_family(model).name == family
    assert split_blocks(model).family == family


def test_composition_equals_forward(case: tuple[str, nn.Module, str, int]) -> None:
    _, model, _, size = case
    split = split_blocks(model)
    x = _inputs(size)
    with torch.no_grad():
        expected = model(x)
        h = split.prefix(x)
        for _, block in split.blocks:
            h = block(h)
        got = split.suffix(h)
        assert torch.allclose(split.run(x), expected, rtol=1e-5, atol=1e-6)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
    assert expected.std() > 1e-3  # the model is not degenerate, so equality means something


def test_block_names_are_model_modules(case: tuple[str, nn.Module, str, int]) -> None:
    _, model, _, _ = case
    split = split_blocks(model)
    modules = dict(model.named_modules())
    assert len(set(split.names)) == len(split.names) >= 2
    for name, block in split.blocks:
        own = block.core if isinstance(block, GluedBlock) else block
        assert modules[name] is own, name
        for glue_name in split.glue.get(name, ()):
            assert glue_name in modules


def test_default_targets_lie_in_exactly_one_block(case: tuple[str, nn.Module, str, int]) -> None:
    name, model, _, size = case
    split = split_blocks(model)
    layers = select_prunable_layers(model)
    assert layers
    for layer in layers:  # by name prefix alone, glue not needed
        owners = [i for i, (b, _) in enumerate(split.blocks) if layer == b or layer.startswith(b + ".")]
        assert len(owners) == 1, (layer, owners)
        assert block_of(layer, split) == block_of(layer, split.blocks) == owners[0]
    grouped = group_layers(layers, split)
    assert sum(len(g) for g in grouped) == len(layers)

    # and functionally: each layer runs exactly once, while its own block runs
    running: list[int] = [-1]
    seen: dict[str, list[int]] = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: seen[n].append(running[0]))
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            h = split.prefix(_inputs(size, batch=1))
            for i, (_, block) in enumerate(split.blocks):
                running[0] = i
                h = block(h)
            running[0] = -2
            split.suffix(h)
    finally:
        for handle in handles:
            handle.remove()
    assert {n: runs for n, runs in seen.items()} == {n: [block_of(n, split)] for n in layers}, name


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def test_dense_by_default(case: tuple[str, nn.Module, str, int]) -> None:
    _, model, family, _ = case
    layers = select_prunable_layers(model)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    head_ids = {id(m) for h in heads for m in h.modules()}
    for name, module in layers.items():
        assert not _is_depthwise(module), name
        assert id(module) not in head_ids, name
        parts = name.split(".")
        assert not {"conv_stem", "stem", "head", "se"} & set(parts), name
        assert not re.match(r"stages\.\d+\.downsample", name), name  # ConvNeXt's per-stage patchify
        assert name != "patch_embed.proj" and not name.startswith("patch_embed.proj"), name
        if family != "vit_hybrid":
            assert not name.startswith("patch_embed"), name
    every = find_prunable_layers(model, targets=["*"])
    assert set(layers) < set(every)  # something stayed dense


def test_vit_targets_exact() -> None:
    model = _vit()
    expected = {f"blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(select_prunable_layers(model)) == expected
    targets, ignore = default_layer_patterns(model)
    assert targets == ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
    assert ignore == []
    assert set(find_prunable_layers(model, targets, ignore or None)) == expected


def test_dinov2_packed_swiglu_and_registers() -> None:
    model = _randomise(_dinov2_giant_like())
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GluMlp) and not mlp.gate_last and mlp.fc1.out_features == 2 * mlp.fc2.in_features
    assert "blocks.0.mlp.fc1" in select_prunable_layers(model)
    reg = _randomise(_dinov2_reg4())
    split = split_blocks(reg)
    with torch.no_grad():
        tokens = split.prefix(_inputs(56))
        assert tokens.shape[1] == 1 + 4 + 16  # class + 4 registers + 4x4 patches
        x = _inputs(42)  # dynamic image size: a 3x3 grid
        assert torch.allclose(split.run(x), reg(x), rtol=1e-5, atol=1e-6)


def test_hybrid_prunes_backbone_convs_not_stem() -> None:
    model = _hybrid_r26_like()
    layers = select_prunable_layers(model)
    backbone = [n for n in layers if n.startswith("patch_embed.backbone.")]
    assert backbone and all(n.startswith("patch_embed.backbone.stages.") for n in backbone)
    assert "patch_embed.backbone.stages.1.blocks.0.downsample.conv" in backbone
    split = split_blocks(model)
    assert split.names[:3] == ["patch_embed.backbone.stages.0.blocks.0", "patch_embed.backbone.stages.1.blocks.0",
                               "patch_embed.backbone.stages.1.blocks.1"]
    assert split.names[3:] == ["blocks.0", "blocks.1"]
    assert block_of("patch_embed.proj", split) == 3  # the tokenisation is glued onto the first ViT block
    with pytest.raises(ValueError, match="lies in no block"):
        block_of("patch_embed.backbone.stem.conv", split)
    stem_only = _hybrid_stem_only()
    assert not any(n.startswith("patch_embed") for n in select_prunable_layers(stem_only))
    assert split_blocks(stem_only).names == ["blocks.0", "blocks.1"]


def test_convnext_downsample_folded_into_first_block_of_stage() -> None:
    model = _convnext()
    split = split_blocks(model)
    assert split.names == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1", "stages.2.blocks.0",
                           "stages.3.blocks.0"]
    assert not isinstance(split.blocks[0][1], GluedBlock)  # stage 0 has no downsample (the stem strides)
    assert [isinstance(b, GluedBlock) for _, b in split.blocks] == [False, True, False, True, True]
    assert split.glue == {f"stages.{i}.blocks.0": (f"stages.{i}.downsample",) for i in (1, 2, 3)}
    assert block_of("stages.1.downsample.1", split) == 1
    assert set(select_prunable_layers(model)) == {f"{b}.mlp.{fc}" for b in split.names for fc in ("fc1", "fc2")}


def test_efficientnet_pointwise_and_head_only() -> None:
    lite0 = _lite0()
    layers = select_prunable_layers(lite0)
    assert all(n == "conv_head" or n.endswith((".conv_pw", ".conv_pwl")) for n in layers)
    assert "blocks.0.0.conv_pw" in layers and "blocks.1.0.conv_pwl" in layers and "conv_head" in layers
    split = split_blocks(lite0)
    assert split.names[0] == "blocks.0.0" and split.names[-1] == "conv_head"
    assert len(split) == sum(len(stage) for stage in lite0.blocks) + 1
    b0 = _efficientnet_b0()
    assert default_layer_patterns(b0) == (["blocks.*", "conv_head"], ["blocks.*.se"])
    assert not any(".se." in n for n in select_prunable_layers(b0))
    assert default_layer_patterns(lite0) == (["blocks.*", "conv_head"], [])  # lite has no squeeze-excite


def test_unknown_model_error_lists_families_and_explicit_targets_work() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    for call in (detect_family, split_blocks, select_prunable_layers, default_layer_patterns):
        with pytest.raises(UnsupportedModelError) as err:
            call(model)
        message = str(err.value)
        assert "Sequential" in message and "explicit targets" in message
        for family in ("vit", "dinov2", "vit_hybrid", "convnext", "efficientnet", "mobilenetv3"):
            assert family in message
    assert list(select_prunable_layers(model, targets=["0"])) == ["0"]
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        split_blocks(resnet)
    assert set(select_prunable_layers(resnet, targets=["layer1.*"], ignore=["layer1.1"])) == {
        "layer1.0.conv1", "layer1.0.conv2"}


def test_block_of_errors_and_plain_lists() -> None:
    split = split_blocks(_vit())
    assert isinstance(split, ModelBlocks)
    assert block_of("blocks.1.mlp.fc2", split.blocks) == 1
    assert split.block_of("blocks.0") == 0
    with pytest.raises(ValueError, match="lies in no block"):
        block_of("head", split)
    with pytest.raises(ValueError, match="lies in no block"):
        block_of("blocks.10.mlp.fc1", split)  # "blocks.1" is not a prefix of "blocks.10"
    nested = [("a", nn.Identity()), ("a.b", nn.Identity())]
    with pytest.raises(ValueError, match="several blocks"):
        block_of("a.b.c", nested)


def test_check_split_catches_a_forward_the_family_does_not_know() -> None:
    class ExtraScale(VisionTransformer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # a subclass doing more than timm's forward
            return 2 * super().forward(x)

    x = _inputs(32)
    model = _randomise(_vit())
    check_split(model, split_blocks(model), x)
    odd = _randomise(ExtraScale(img_size=32, patch_size=8, **VIT))
    assert detect_family(odd).name == "vit"
    with pytest.raises(ValueError, match="does not reproduce its forward"):
        check_split(odd, split_blocks(odd), x)
