"""Storage: atomic writes, and ranged safetensors reads that fetch only the tensors asked for."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save

from cap_dist.storage import atomic_write_bytes, load_tensor_subset, read_bytes


@pytest.mark.parametrize("root", ["local", "memory://subset"])
def test_subset_reads_exactly_the_requested_tensors(root: str, tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b.w": torch.arange(10, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bool),
               "d": torch.randn(5).to(torch.bfloat16)}
    uri = str(tmp_path / "t.safetensors") if root == "local" else f"{root}/t.safetensors"
    atomic_write_bytes(uri, save(tensors))
    got = load_tensor_subset(uri, ["b.w", "d", "c"])
    assert sorted(got) == ["b.w", "c", "d"]
    for key in got:
        assert torch.equal(got[key], tensors[key])
    with pytest.raises(KeyError, match="has no tensors"):
        load_tensor_subset(uri, ["zzz"])


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    atomic_write_bytes(str(target), b"abc")
    assert read_bytes(str(target)) == b"abc"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]
    fs = fsspec.filesystem("memory")
    atomic_write_bytes("memory://atomic/x.bin", b"xyz")
    assert fs.ls("/atomic", detail=False) == ["/atomic/x.bin"]
