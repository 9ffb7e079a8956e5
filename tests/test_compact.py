"""The compact export: bit-exact round trips (sparsity levels, dtypes, conv and odd shapes, −0.0, int8 and
packed int4 codes), the documented bit and nibble orders, sizes, and clear errors for bad files."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from cap_dist.compact import (COMPACT, CorruptCompactError, compact_from_output, dense_file_from_compact,
                              encode_on_grid, export_compact, load_compact, pack_bits, pack_nibbles, unpack_bits,
                              unpack_nibbles, write_compact)
from cap_dist.output import CorruptOutputError
from cap_dist.solvers.quantize import quantize_layer, quantize_rtn

from tests.solvers.synthetic import correlated_problem


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_restores(blob: bytes, state: dict[str, torch.Tensor]) -> None:
    restored = load_compact(blob)
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert same_bits(restored[name], tensor), name


def sparse(shape: tuple[int, ...], sparsity: float | str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random weight with the given fraction (or "2:4" pattern) of exact +0.0 entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if sparsity == "2:4":
        groups = w.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        keep = keep.reshape(shape)
    else:
        keep = torch.rand(shape, generator=g) >= sparsity
    return torch.where(keep, w, torch.zeros_like(w)).to(dtype)


def model_state(sparsity: float | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"fc.weight": sparse((24, 40), sparsity, dtype), "fc.bias": torch.randn(24).to(dtype),
            "conv.weight": sparse((8, 3, 3, 4), sparsity, dtype, seed=1),                 # [out, in, kh, kw]
            "odd.weight": sparse((7, 9), 0.5 if sparsity == "2:4" else sparsity, dtype, seed=2),  # 63: padding
            "pos": torch.randn(1, 5, 8), "step": torch.tensor(3), "ids": torch.arange(6)}


LAYERS = ["fc", "conv", "odd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, "2:4"])
def test_round_trip_is_bit_exact(sparsity, dtype) -> None:
    state = model_state(sparsity, dtype)
    blob = export_compact(state, LAYERS)
    assert_restores(blob, state)
    stored = safetensors_load(blob)
    assert stored["conv.weight.shape"].tolist() == [8, 3, 3, 4]
    assert stored["odd.weight.mask"].numel() == 8                                   # ceil(63 / 8)
    assert stored["fc.weight.values"].dtype == dtype
    assert "fc.weight" not in stored and "fc.bias" in stored
    assert dense_file_from_compact(blob) == safetensors_save(state)                 # the dense file, rebuilt


def test_negative_zeros_survive() -> None:
    w = torch.randn(16, 16)
    state = {"fc.weight": w * (torch.rand(16, 16) > 0.5)}                            # -0.0 where w < 0
    assert bool(torch.signbit(state["fc.weight"][state["fc.weight"] == 0]).any())
    blob = export_compact(state, ["fc"])
    assert "fc.weight.negzero" in safetensors_load(blob)
    assert_restores(blob, state)
    plus = {"fc.weight": torch.where(state["fc.weight"] == 0, torch.zeros(()), state["fc.weight"])}
    assert "fc.weight.negzero" not in safetensors_load(export_compact(plus, ["fc"]))


def test_bit_and_nibble_orders_are_as_documented() -> None:
    flags = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)         # element 8k+b -> bit b of byte k
    assert pack_bits(flags).tolist() == [1, 2]
    assert torch.equal(unpack_bits(pack_bits(flags), 10), flags)
    assert pack_nibbles(torch.tensor([1, 2, -1])).tolist() == [0x21, 0x0F]           # low nibble first, two's compl.
    signed = torch.arange(-7, 8)
    assert torch.equal(unpack_nibbles(pack_nibbles(signed), 15, signed=True), signed.to(torch.int16))
    unsigned = torch.arange(0, 16)
    assert torch.equal(unpack_nibbles(pack_nibbles(unsigned), 16, signed=False), unsigned.to(torch.int16))


def quantized_state(bits: int, group_size: int | None, symmetric: bool, odd: bool = True):
    """A pruned correlated layer quantized with GPTQ (with ``odd``: an odd number of nonzero codes, so the last
    packed byte holds one nibble) and a conv layer quantized with RTN."""
    w, _, h = correlated_problem(rows=8, cols=32, samples=128, seed=0, dtype=torch.float32)
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(0)) > 0.5
    for column in range(32):
        fc = quantize_layer(w * keep, h, bits=bits, group_size=group_size, symmetric=symmetric, mask=keep)
        if not odd or int((fc.weight != 0).sum()) % 2 == 1:
            break
        keep[0, column] = ~keep[0, column]
    conv_w = sparse((4, 2, 2, 8), 0.5, torch.float32).reshape(4, 32)
    conv = quantize_rtn(conv_w, bits=bits, group_size=group_size, symmetric=symmetric, mask=conv_w != 0)
    state = {"fc.weight": fc.weight, "conv.weight": conv.weight.reshape(4, 2, 2, 8), "fc.bias": torch.randn(8)}
    return state, {"fc": fc, "conv": conv}


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 16, False), (4, 16, True),
                                                       (4, None, False), (3, 8, True)])
def test_quantized_layers_round_trip_to_the_dequantized_weight(bits, group_size, symmetric) -> None:
    state, quant = quantized_state(bits, group_size, symmetric)
    blob = export_compact(state, ["fc", "conv"], quant)
    assert_restores(blob, state)
    stored = safetensors_load(blob)
    kept = int((state["fc.weight"] != 0).sum())
    codes = stored["fc.weight.codes"]
    if bits <= 4:
        assert kept % 2 == 1 and codes.dtype == torch.uint8 and codes.numel() == (kept + 1) // 2
    else:
        assert codes.dtype == (torch.int8 if symmetric else torch.uint8) and codes.numel() == kept
    assert stored["fc.weight.scales"].shape == (8, 32 // (group_size or 32))
    assert ("fc.weight.zeros" in stored) == (not symmetric)
    meta = json.loads(json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]["cap_dist_compact"])
    assert meta["layers"]["fc.weight"]["quant"] == {"bits": bits, "group_size": group_size, "symmetric": symmetric}


def test_a_tensor_that_is_not_its_quantization_is_refused() -> None:
    state, quant = quantized_state(4, 16, True)
    state["fc.weight"] = state["fc.weight"] * 1.001
    with pytest.raises(ValueError, match="fc.weight would not round-trip bit-exactly"):
        export_compact(state, ["fc", "conv"], quant)
    with pytest.raises(ValueError, match="has no tensor 'head.weight'"):
        export_compact(state, ["head"])
    with pytest.raises(ValueError, match="not in `layers`"):
        export_compact(state, ["conv"], quant)


def test_grid_encodings_are_recovered_from_dequantized_weights() -> None:
    for bits, group_size in [(8, None), (4, 16), (4, None)]:
        state, quant = quantized_state(bits, group_size, True)
        enc = encode_on_grid(state["fc.weight"], bits, group_size)
        assert enc is not None
        assert_restores(export_compact(state, ["fc"], {"fc": enc}), state)
    assert encode_on_grid(torch.randn(8, 32), 4, 16) is None                         # not on any grid


@pytest.mark.parametrize("sparsity,limit", [(0.5, 0.6), (0.9, 0.2)])
def test_size_against_the_dense_file(sparsity, limit) -> None:
    state = {"fc.weight": sparse((256, 256), sparsity, torch.float32)}
    dense = safetensors_save(state)
    ratio = len(export_compact(state, ["fc"], dense=dense)) / len(dense)
    assert ratio < limit
    state8, quant = quantized_state(8, None, True, odd=False)
    assert len(export_compact(state8, ["fc", "conv"], quant)) < len(export_compact(state8, ["fc", "conv"]))


def test_truncated_corrupt_and_foreign_files_fail_clearly(tmp_path: Path) -> None:
    state = model_state(0.5, torch.float32)
    blob = export_compact(state, LAYERS)
    path = tmp_path / "model.compact.safetensors"
    for damaged in (blob[: len(blob) // 2], blob[:20], b"", b"\xff" * 64):
        path.write_bytes(damaged)
        with pytest.raises(CorruptCompactError, match=str(path)):
            load_compact(str(path))
    header_size = struct.unpack("<Q", blob[:8])[0]
    flipped = bytearray(blob)
    flipped[8 + header_size // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCompactError, match=str(path)):
        load_compact(str(path))
    plain = tmp_path / "plain.safetensors"
    save_file(state, plain)
    with pytest.raises(CorruptCompactError, match="has no 'cap_dist_compact' metadata"):
        load_compact(str(plain))


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    state = {"fc.weight": sparse((4, 8), 0.5, torch.float32)}
    tensors = safetensors_load(export_compact(state, ["fc"]))
    meta = {"format": "cap-dist-compact", "version": 2, "layers": {}, "dense": {}}
    path = tmp_path / "v2.safetensors"
    path.write_bytes(safetensors_save(tensors, {"cap_dist_compact": json.dumps(meta)}))
    with pytest.raises(CorruptCompactError, match=r"version 2; this cap-dist reads version 1"):
        load_compact(str(path))


def test_the_dense_file_with_its_metadata_is_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    state = model_state(0.5, torch.bfloat16)
    save_file(state, tmp_path / "model.safetensors", {"format": "pt", "cap_dist": "0.1.0"})
    dense = (tmp_path / "model.safetensors").read_bytes()
    size = write_compact(str(tmp_path / COMPACT), state, LAYERS, dense=dense)
    assert size == (tmp_path / COMPACT).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [COMPACT, "model.safetensors"]   # no temporary left
    assert dense_file_from_compact(str(tmp_path / COMPACT)) == dense
    with pytest.raises(CorruptCompactError, match="does not match the sha256"):
        dense_file_from_compact(export_compact(state, LAYERS, dense=dense[:-1] + b"\x01"))


def fake_output(root: Path, state: dict[str, torch.Tensor], layers: list[str]) -> Path:
    """A finished pruning output folder, as far as compact_from_output reads it."""
    root.mkdir()
    save_file(state, root / "model.safetensors", {"format": "pt", "cap_dist": "0.1.0"})
    digest = hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest()
    manifest = {"recipe": {"prune": {}}, "layers": [{"layer": name, "numel": state[f"{name}.weight"].numel()}
                                                    for name in layers],
                "files": {"model.safetensors": digest}}
    (root / "sparsity.json").write_text(json.dumps(manifest))
    return root


def test_compact_from_an_output_folder(tmp_path: Path) -> None:
    state = {"blocks.0.fc.weight": sparse((64, 64), 0.9, torch.float32), "blocks.0.fc.bias": torch.randn(64)}
    root = fake_output(tmp_path / "out", state, ["blocks.0.fc"])
    manifest_before = (root / "sparsity.json").read_bytes()
    sizes = compact_from_output(str(root))
    assert sizes["path"] == f"{root}/{COMPACT}" and sizes["layers"] == 1 and sizes["quantized_layers"] == 0
    assert sizes["dense_bytes"] == (root / "model.safetensors").stat().st_size
    assert sizes["compact_bytes"] == (root / COMPACT).stat().st_size
    assert sizes["ratio"] == pytest.approx(sizes["compact_bytes"] / sizes["dense_bytes"]) and sizes["ratio"] < 0.3
    assert (root / "sparsity.json").read_bytes() == manifest_before                 # manifest untouched
    assert_restores((root / COMPACT).read_bytes(), state)
    (root / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptOutputError, match="model.safetensors is corrupt"):
        compact_from_output(str(root))


def test_cli_export_writes_the_compact_file_and_reports_its_size(tmp_path, capsys) -> None:
    """`cap-dist export` on a real pruning output folder: the file restores the weights bit for bit."""
    import json as _json

    import timm
    from safetensors.torch import save_file

    from cap_dist.cli import main
    from cap_dist.config import recipe_from_dict
    from cap_dist.output import load_sparse
    from cap_dist.engines import prune

    kwargs = {"img_size": 16, "patch_size": 8, "num_classes": 3, "embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(**kwargs)
    (tmp_path / "vit").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vit" / "model.safetensors"))
    (tmp_path / "vit" / "model.json").write_text(_json.dumps({"architecture": "timm:VisionTransformer",
                                                              "create_kwargs": kwargs, "input": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    import numpy as np
    from PIL import Image

    for i in range(8):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "img" / f"c{i % 2}" / f"{i}.png")
    recipe = recipe_from_dict({"model": {"source": str(tmp_path / "vit")}, "calibration": {"uri": str(tmp_path / "img")},
                               "prune": {"sparsity": 0.75, "block_size": 16}, "output": str(tmp_path / "out"),
                               "engine": "local", "device": "cpu"})
    prune(recipe)
    assert main(["export", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "model.compact.safetensors" in printed and "of the dense" in printed
    restored = load_compact(str(tmp_path / "out" / "model.compact.safetensors"))
    sparse, _ = load_sparse(str(tmp_path / "out"))
    for name, tensor in sparse.state_dict().items():
        assert torch.equal(restored[name], tensor), name
