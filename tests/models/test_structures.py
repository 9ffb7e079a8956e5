"""Physical removal of structures is exact: a model whose removed groups' consumer columns are zero computes the
same outputs before and after the modules shrink; recorded shapes rebuild the same model from a fresh skeleton."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from cap_dist.models.capture import flattened_weight, set_flattened_weight
from cap_dist.models.structures import (StructureError, apply_structure_shapes, find_structures, remove_groups,
                                        structure_shapes)


def _vit(mlp_layer=None) -> torch.nn.Module:
    kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5, mlp_ratio=2.0)
    if mlp_layer is not None:
        kwargs.update(mlp_layer=mlp_layer, act_layer=torch.nn.SiLU)
        if mlp_layer is SwiGLUPacked:
            kwargs["mlp_ratio"] = 4.0              # packed: fc1 holds both halves
    return VisionTransformer(**kwargs).eval()


MODELS = {
    "vit": (_vit, (2, 3, 16, 16)),
    "vit-swiglu-packed": (lambda: _vit(SwiGLUPacked), (2, 3, 16, 16)),
    "vit-swiglu": (lambda: _vit(SwiGLU), (2, 3, 16, 16)),
    "convnext": (lambda: timm.create_model("test_convnext", num_classes=5).eval(), (2, 3, 32, 32)),
    "effnet-lite0": (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5).eval(), (2, 3, 32, 32)),
}


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


@pytest.mark.parametrize("family", list(MODELS))
def test_removal_matches_zeroed_consumer_columns(family: str) -> None:
    torch.manual_seed(0)
    build, shape = MODELS[family]
    model = build()
    _randomise_batchnorm(model)
    x = torch.randn(shape)
    structures = find_structures(model)
    kinds = {s.kind for s in structures}
    assert kinds == ({"channels"} if family == "effnet-lite0" else {"mlp"} if family == "convnext"
                     else {"mlp", "heads"})
    keeps = {}
    for s in structures:
        keep = torch.randperm(s.groups)[: max(1, s.groups // 2)].sort().values
        keeps[s.name] = keep
        consumer = model.get_submodule(s.consumer)
        w = flattened_weight(consumer).clone()
        mask = torch.ones(s.groups, dtype=torch.bool)
        mask[keep] = False
        w[:, s.columns()[mask].reshape(-1)] = 0.0
        set_flattened_weight(consumer, w)
    with torch.no_grad():
        expected = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    reduced = [remove_groups(model, s, keeps[s.name]) for s in structures]
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert [s.groups for s in find_structures(model)] == [s.groups for s in reduced]

    fresh = build()                                          # rebuild from the shapes record, load, same outputs
    apply_structure_shapes(fresh, structure_shapes(reduced))
    fresh.load_state_dict(model.state_dict(), strict=True)
    apply_structure_shapes(fresh, structure_shapes(reduced))  # a second time changes nothing
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), got)


def test_attention_keeps_timm_forward_with_fewer_heads() -> None:
    model = _vit()
    attn = find_structures(model, ("heads",))[0]
    remove_groups(model, attn, torch.tensor([1, 3]))
    module = model.get_submodule(attn.name)
    assert (module.num_heads, module.attn_dim, module.qkv.out_features, module.proj.in_features) == (2, 16, 48, 16)


def test_unsupported_variants_and_bad_records_are_clear_errors() -> None:
    with pytest.raises(StructureError, match="squeeze-excite"):
        find_structures(timm.create_model("test_efficientnet"), ("channels",))
    with pytest.raises(ValueError, match="unknown structure kind"):
        find_structures(_vit(), ("rows",))
    with pytest.raises(ValueError, match="no channels structures"):
        find_structures(_vit(), ("channels",))
    model = _vit()
    with pytest.raises(StructureError, match="does not have"):
        apply_structure_shapes(model, {"blocks.9.mlp": {"kind": "mlp", "groups": 3}})
    with pytest.raises(StructureError, match="is a Mlp"):
        apply_structure_shapes(model, {"blocks.0.mlp": {"kind": "heads", "groups": 3}})
    with pytest.raises(StructureError, match=r"\[0, 64\]"):   # 0: a whole pre-norm branch
        apply_structure_shapes(model, {"blocks.0.mlp": {"kind": "mlp", "groups": 65}})
