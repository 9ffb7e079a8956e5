"""Whole residual branches: the constant that replaces one is the least-squares optimum, its loss formula is the
measured one, a model with branches removed computes what the constant predicts and rebuilds from its record, and
structured pruning removes whole branches when the target needs them."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from cap_dist.config import StructuredConfig
from cap_dist.models.structures import (ConstantBranch, StructureError, apply_structure_shapes, branch_norm,
                                        find_structures, infer_structure_shapes, remove_branch, removed_branches)
from cap_dist.models.capture import input_means
from cap_dist.structured.branches import branch_constant, branch_relative_loss
from cap_dist.structured.prune import prune_structured


def _vit(depth: int = 2, global_pool: str = "token") -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2.0,
                             num_classes=5, global_pool=global_pool).eval()


def test_constant_is_the_least_squares_optimum_and_the_loss_formula_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) + torch.randn(12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    mu = x.mean(0)
    c = branch_constant(w, b, mu)
    out = x @ w.T + b
    torch.testing.assert_close(c, out.mean(0))               # argmin_c Σ‖out_i − c‖² is the mean
    h = 2.0 / x.shape[0] * x.T @ x                            # the accumulators' H = 2/N·XXᵀ
    measured = float((x @ w.T - (w @ mu)).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert branch_relative_loss(w, h, mu) == pytest.approx(measured, rel=1e-10)


def test_removed_branch_computes_the_constant_and_rebuilds_from_the_record() -> None:
    model = _vit()
    x = torch.randn(4, 3, 16, 16)
    structures = {s.name: s for s in find_structures(model, ("mlp", "heads"))}
    assert branch_norm(model, "blocks.0.attn") == "blocks.0.norm1"
    assert branch_norm(model, "blocks.1.mlp") == "blocks.1.norm2"
    constant = torch.randn(32)
    expected_block = model.blocks[1]
    with torch.no_grad():
        stream = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
        want = stream + constant + expected_block.mlp(expected_block.norm2(stream + constant))
    remove_branch(model, structures["blocks.1.attn"], constant)
    assert isinstance(model.blocks[1].attn, ConstantBranch) and isinstance(model.blocks[1].norm1, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1](stream), want)
        out = model(x)
    state = model.state_dict()
    assert "blocks.1.attn.constant" in state and "blocks.1.attn.proj.weight" not in state
    record = infer_structure_shapes(_vit().to("meta"), state)
    assert record == removed_branches(model) == {"blocks.1.attn": {"kind": "heads", "groups": 0}}
    fresh = _vit()
    apply_structure_shapes(fresh, record)
    apply_structure_shapes(fresh, record)                     # a second time changes nothing
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


def test_only_pre_norm_block_branches_can_be_removed_whole() -> None:
    effnet = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    structure = next(s for s in find_structures(effnet, ("channels",)) if s.groups > 1)
    assert branch_norm(effnet, structure.name) is None
    with pytest.raises(StructureError, match="pre-norm timm Block"):
        remove_branch(effnet, structure, torch.zeros(1))
    with pytest.raises(StructureError, match=r"\[1, "):
        apply_structure_shapes(effnet, {structure.name: {"kind": "channels", "groups": 0}})


def test_input_means_average_every_token() -> None:
    layer = torch.nn.Linear(6, 3)
    xs = [torch.randn(2, 5, 6), torch.randn(3, 5, 6)]
    means = input_means(lambda: [layer(x) for x in xs], {"l": layer})
    torch.testing.assert_close(means["l"], torch.cat([x.reshape(-1, 6) for x in xs]).double().mean(0))


@pytest.mark.parametrize("measure", ["flops", "latency"])
def test_a_target_beyond_partial_limits_removes_whole_branches(measure: str) -> None:
    # Average pooling: the class token alone, with its block's attention gone, would see no image at all, and an
    # allocation that predicts the same for every image is refused (see test_search.py).
    model = _vit(depth=3, global_pool="avg")
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    with torch.no_grad():
        dense = model(inputs[0])
    # max_fraction 0.5 leaves half of every module: keeping 30 % of the compute needs whole branches.
    cfg = StructuredConfig(target=0.3 if measure == "flops" else 0.6, max_fraction=0.5, branches=True,
                           measure=measure, latency_batch=8)
    records = prune_structured(model, inputs, cfg)
    whole = [r for r in records if r.kept == 0]
    assert whole, [(r.name, r.kept) for r in records]
    assert all(0 < r.kept or r.rel_error <= 1.0 for r in records)
    assert removed_branches(model) == {r.name: {"kind": r.kind, "groups": 0} for r in whole}
    with torch.no_grad():
        out = model(inputs[0])
    assert torch.isfinite(out).all() and out.shape == dense.shape
    without = _vit(depth=3, global_pool="avg")
    with pytest.raises(Exception, match="max_fraction"):      # the same target without whole branches
        prune_structured(without, inputs, cfg.model_copy(update={"branches": False}))
