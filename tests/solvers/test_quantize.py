"""Quantization of pruned layers: the grid, the mask (pruned weights stay exactly 0), GPTQ against RTN, errors,
and the pipeline's ``prune.quantize`` option end to end on a tiny ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cap_dist.config import RecipeError, recipe_from_dict
from cap_dist.solvers import prune_layer
from cap_dist.solvers.quantize import dequantize, level_range, quantize, quantize_layer, quantize_rtn

from tests.solvers.synthetic import correlated_problem

QUANTIZERS = {"gptq": quantize_layer, "rtn": quantize_rtn}


def pruned_layer(rows: int = 16, cols: int = 64, sparsity: float = 0.5, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pruned weight, H, keep-mask) of a correlated synthetic layer, pruned with SparseGPT."""
    w, _, h = correlated_problem(rows=rows, cols=cols, samples=4 * cols, seed=seed, dtype=torch.float32)
    res = prune_layer(w, h, method="sparsegpt", sparsity=sparsity)
    return res.weight.to(dtype), h, res.mask


def expanded(per_group: torch.Tensor, cols: int) -> torch.Tensor:
    return per_group.repeat_interleave(cols // per_group.shape[1], dim=1)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 16, True), (4, None, False),
                                                       (3, 16, False), (2, None, True)])
def test_pruned_weights_stay_zero_and_dequantized_is_codes_times_scale(method, bits, group_size, symmetric) -> None:
    w, h, keep = pruned_layer(sparsity=0.75)
    res = QUANTIZERS[method](w, h, bits=bits, group_size=group_size, symmetric=symmetric, mask=keep)
    # (a) pruned positions: weight exactly +0.0 and code 0, whatever compensation passed through them
    assert torch.equal(res.weight[~keep], torch.zeros(int((~keep).sum())))
    assert not torch.signbit(res.weight[~keep]).any()
    assert torch.equal(res.codes[~keep], torch.zeros_like(res.codes[~keep]))
    assert res.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    lo, hi = level_range(bits, symmetric)
    assert int(res.codes.min()) >= lo and int(res.codes.max()) <= hi
    assert res.scales.dtype == torch.float32 and res.scales.shape == (16, 64 // (group_size or 64))
    # (b) kept positions: (c − z)·s, a float32 product, bit for bit
    levels = res.codes.to(torch.float32)
    if not symmetric:
        levels = levels - expanded(res.zero_points, 64).to(torch.float32)
    assert torch.equal(res.weight[keep], (levels * expanded(res.scales, 64))[keep])
    assert torch.equal(res.weight, torch.where(keep, dequantize(res.codes, res.scales, res.zero_points,
                                                                 torch.float32), torch.zeros_like(w)))


def test_no_mask_keeps_everything() -> None:
    w, h, _ = pruned_layer(sparsity=0.0)
    res = quantize_layer(w, h, bits=8)
    assert bool(res.mask.all()) and res.weight.shape == w.shape
    assert res.relative_error < 1e-3


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 16), (3, None), (8, None)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, group_size, seed) -> None:
    w, h, keep = pruned_layer(rows=32, cols=128, seed=seed)
    gptq = quantize_layer(w, h, bits=bits, group_size=group_size, mask=keep)
    rtn = quantize_rtn(w, h, bits=bits, group_size=group_size, mask=keep)
    assert gptq.loss < 0.85 * rtn.loss
    assert gptq.energy == pytest.approx(rtn.energy)


def test_int8_error_is_tiny_relative_to_the_layer() -> None:
    w, h, keep = pruned_layer(rows=32, cols=128)
    res = quantize_layer(w, h, bits=8, mask=keep)
    assert res.relative_error < 1e-4
    assert res.loss > 0


def test_groups_beat_per_channel_for_int4_rtn() -> None:
    w, h, keep = pruned_layer(rows=32, cols=128)
    grouped = quantize_rtn(w, h, bits=4, group_size=32, mask=keep)
    per_channel = quantize_rtn(w, h, bits=4, mask=keep)
    assert grouped.loss < per_channel.loss


def test_float64_and_bfloat16_weights_keep_their_dtype() -> None:
    w, h, keep = pruned_layer()
    wide = quantize_layer(w.double(), h.double(), bits=4, group_size=16, mask=keep)
    assert wide.weight.dtype == torch.float64
    narrow = quantize_layer(w.bfloat16(), h, bits=4, group_size=16, mask=keep)
    assert narrow.weight.dtype == torch.bfloat16
    assert torch.equal(narrow.weight, dequantize(narrow.codes, narrow.scales, None, torch.bfloat16) * keep)


def test_bad_arguments_are_clear() -> None:
    w, h, keep = pruned_layer()
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match=r"bits=.* is outside \[2, 8\]"):
            quantize_layer(w, h, bits=bits)
    with pytest.raises(ValueError, match="group_size=24 does not divide the layer's 64 input columns"):
        quantize_layer(w, h, bits=4, group_size=24)
    with pytest.raises(ValueError, match="group_size=0 must be a positive integer"):
        quantize_rtn(w, h, bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"mask has shape \(16, 32\); the weight is \(16, 64\)"):
        quantize_layer(w, h, bits=4, mask=keep[:, :32])
    with pytest.raises(ValueError, match="outside the mask are not zero"):
        quantize_layer(w + 1.0, h, bits=4, mask=keep)
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        quantize_layer(w.reshape(-1), h, bits=4)
    fisher = torch.eye(16).expand(64, 16, 16).contiguous()
    with pytest.raises(ValueError, match="GPTQ needs input-activation curvature"):
        quantize_layer(w, fisher, bits=4)
    assert quantize_rtn(w, fisher, bits=4, mask=keep).loss > 0       # RTN measures its loss on Fisher blocks too
    with pytest.raises(ValueError, match="method='awq' is not one of gptq, rtn"):
        quantize(w, h, method="awq", bits=4, group_size=None, symmetric=True, mask=keep)


# ----------------------------------------------------------------------------------------------------
# The pipeline: prune.quantize


# The tiny ViT folder and images of the pipeline tests (module-scoped fixture, one copy per module).
from tests.engines.local.test_pipeline import workdir  # noqa: E402,F401


def recipe_tree(workdir: Path, name: str, **prune_cfg) -> dict:
    return {"model": {"source": str(workdir / "vit")},
            "calibration": {"uri": str(workdir / "images"), "samples": 16, "batch_size": 8},
            "prune": {"method": "cap", "sparsity": 0.5, "block_size": 16, "mode": "independent", **prune_cfg},
            "output": str(workdir / "out" / name), "device": "cpu", "engine": "local"}


def on_int8_grid(row: torch.Tensor) -> bool:
    """Some scale s puts every weight of the row on an integer level |c| ≤ 127 (the scale is max|w|/c_max)."""
    values = row[row != 0].double()
    if values.numel() == 0:
        return True
    for top in range(127, 100, -1):
        ratio = values / (values.abs().max() / top)
        if bool(((ratio - ratio.round()).abs() < 1e-4).all()):
            return True
    return False


def test_pipeline_quantizes_pruned_layers_to_int8(workdir: Path) -> None:
    from cap_dist.engines import prune

    plain = prune(recipe_from_dict(recipe_tree(workdir, "plain")), write=False)
    quant = prune(recipe_from_dict(recipe_tree(workdir, "int8", quantize={"bits": 8})), write=False)
    modules, plain_modules = dict(quant.model.named_modules()), dict(plain.model.named_modules())
    for p, q in zip(plain.layers, quant.layers):
        assert (q.layer, q.sparsity, q.quant_bits, q.quant_group_size) == (p.layer, p.sparsity, 8, None)
        w, pruned = modules[q.layer].weight.detach(), plain_modules[q.layer].weight.detach()
        assert torch.equal(w[pruned == 0], torch.zeros(int((pruned == 0).sum())))   # pruned weights stay zero
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)      # sparsity unchanged
        assert all(on_int8_grid(row) for row in w.reshape(w.shape[0], -1))
        assert q.rel_error <= p.rel_error * 1.02 + 1e-5                             # only slightly worse
        # int8 adds little: ≤ 20 % of the pruning loss (5 % before cap polished by default, 10 % before the polish
        # damping fell to 1e-3: each cut the pruning loss on these tiny layers, not the int8 loss)
        assert 0 < q.quant_loss < 0.2 * p.loss
    assert plain.layers[0].quant_bits is None


def test_pipeline_int4_output_exports_compact_with_codes(workdir: Path) -> None:
    from cap_dist.compact import COMPACT, compact_from_output, load_compact
    from cap_dist.output import load_sparse, read_manifest
    from cap_dist.engines import prune

    recipe = recipe_from_dict(recipe_tree(workdir, "int4", quantize={"bits": 4, "group_size": 16}))
    report = prune(recipe)
    assert all(r.quant_bits == 4 and r.quant_group_size == 16 for r in report.layers)
    assert read_manifest(recipe.output)["layers"][0]["quant_bits"] == 4
    sizes = compact_from_output(recipe.output)
    assert sizes["layers"] == 8 and sizes["quantized_layers"] == 8              # scales recovered exactly
    assert sizes["compact_bytes"] < sizes["dense_bytes"] and sizes["path"].endswith(COMPACT)
    model, _ = load_sparse(recipe.output)
    restored = load_compact(sizes["path"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored[name], tensor)


def test_quantize_recipe_options_are_validated(workdir: Path) -> None:
    for bad, message in [({"bits": 1}, "greater than or equal to 2"), ({"bits": 16}, "less than or equal to 8"),
                         ({"method": "awq"}, "'gptq' or 'rtn'"), ({"group": 4}, "unknown key")]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(recipe_tree(workdir, "bad", quantize=bad))
    assert recipe_from_dict(recipe_tree(workdir, "ok")).prune.quantize.bits is None
