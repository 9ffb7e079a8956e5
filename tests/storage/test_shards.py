"""Sharded weights: the shard writer (atomic, byte-deterministic), the index, every reader on both layouts
(load_sparse, cap-dist eval, export, a sharded output as the next step's model source), and checksums that name
the truncated or tampered shard. No Ray here: the shards are cut from a local-engine output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cap_dist.config import recipe_from_dict
from cap_dist.engines import prune
from cap_dist.engines.distributed.plan import shard_owners
from cap_dist.finetune.sharded_io import assign_tensors, fsdp_rows
from cap_dist.models.source import ModelSource
from cap_dist.output import CorruptOutputError, load_output_subset, load_sparse, read_manifest, write_output
from cap_dist.shards import (INDEX, index_bytes, load_weight_subset, load_weights, open_weights, shard_name,
                             write_safetensors)
from tests.dense_models import write_dense_vit

VIT = {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 32, "depth": 3, "num_heads": 2,
       "mlp_ratio": 2.0}
INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _tree(root: Path, out: str, source: Path | None = None, sparsity: float = 0.5) -> dict:
    return {"model": {"source": str(source or root / "dense")},
            "calibration": {"uri": str(root / "images"), "samples": 8, "batch_size": 4},
            "evaluation": {"uri": str(root / "images"), "samples": 8, "batch_size": 4},
            "prune": {"method": "magnitude", "sparsity": sparsity}, "output": str(root / out), "device": "cpu",
            "engine": "local", "threads": 1}


def reshard(single: Path, sharded: Path, parts: int) -> dict:
    """A sharded copy of a single-file output: the tensors cut into ``parts`` shards (what the Ray engine's actors
    write), the index and manifest written by :func:`write_output`; returns the manifest."""
    manifest = read_manifest(str(single))
    state = load_sparse(str(single))[0].state_dict()
    keys = list(state)
    groups = [keys[i::parts] for i in range(parts)]
    shards = [write_safetensors(str(sharded / shard_name(i + 1, parts)), {k: state[k].contiguous() for k in g})
              for i, g in enumerate(groups)]
    recipe = recipe_from_dict(dict(manifest["recipe"], output=str(sharded)))
    return write_output(recipe, None, manifest["layers"], manifest["input"], manifest["timings"],
                        extra={"engine": "ray"}, shards=shards)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dense_vit(root / "dense", VIT, INPUT)
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / "images" / f"c{label}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((36, 36, 3)) * 200 + label * 40).astype(np.uint8)).save(
                root / "images" / f"c{label}" / f"{i}.png")
    prune(recipe_from_dict(_tree(root, "single")))
    reshard(root / "single", root / "sharded", 3)
    return root


def test_shard_writer_is_atomic_and_byte_deterministic(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(4, 3) for i in range(5)}
    a = write_safetensors(str(tmp_path / "a" / shard_name(1, 2)), tensors)
    b = write_safetensors(str(tmp_path / "b" / shard_name(1, 2)), dict(reversed(tensors.items())))
    assert a.sha256 == b.sha256 and a.size == b.size == (tmp_path / "a" / a.name).stat().st_size
    assert (tmp_path / "a" / a.name).read_bytes() == (tmp_path / "b" / b.name).read_bytes()
    assert a.name == "model-00001-of-00002.safetensors" and a.tensor_bytes == 5 * 12 * 4
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [a.name]            # no temporary left
    index = json.loads(index_bytes([a]))
    assert index == {"metadata": {"total_size": 240}, "weight_map": {f"t{i}": a.name for i in range(5)}}
    with pytest.raises(ValueError, match="in two shards"):
        index_bytes([a, b])


def test_sharded_output_is_the_single_output(outputs: Path) -> None:
    single, single_manifest = load_sparse(str(outputs / "single"))
    sharded, manifest = load_sparse(str(outputs / "sharded"))
    assert manifest["weights"] == INDEX and single_manifest["weights"] == "model.safetensors"
    assert sorted(n for n in manifest["files"] if n.startswith("model-")) == [shard_name(i, 3) for i in (1, 2, 3)]
    for key, tensor in single.state_dict().items():
        assert torch.equal(tensor, sharded.state_dict()[key]), key
    index = json.loads((outputs / "sharded" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in single.state_dict().values())
    assert json.loads((outputs / "sharded" / "model.json").read_text())["weights"] == INDEX
    files = open_weights(str(outputs / "sharded" / INDEX))
    assert files.names == [shard_name(i, 3) for i in (1, 2, 3)] and set(files.weight_map) == set(single.state_dict())


def test_row_ranges_are_one_ranged_read_each(outputs: Path) -> None:
    full = load_weights(str(outputs / "sharded" / INDEX))
    key = "blocks.1.mlp.fc1.weight"                                        # [64, 32]
    part = load_weight_subset(str(outputs / "sharded" / INDEX), [key, "cls_token"], {key: (10, 37)})
    assert torch.equal(part[key], full[key][10:37]) and torch.equal(part["cls_token"], full["cls_token"])
    with pytest.raises(ValueError, match="outside tensor"):
        load_weight_subset(str(outputs / "sharded" / INDEX), [key], {key: (60, 70)})


@pytest.mark.parametrize("damage", ["tamper", "truncate", "delete"])
def test_a_damaged_shard_is_named(outputs: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "out"
    reshard(outputs / "single", folder, 3)
    victim = folder / shard_name(2, 3)
    data = bytearray(victim.read_bytes())
    if damage == "tamper":
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-100]))
    else:
        victim.unlink()
    message = {"tamper": "sha256 does not match", "truncate": "bytes where", "delete": "is missing"}[damage]
    with pytest.raises(CorruptOutputError, match=f"{shard_name(2, 3)}.*{message}"):
        load_sparse(str(folder))
    if damage != "tamper":                      # ranged readers check sizes (a same-size tamper needs the sha256)
        with pytest.raises(CorruptOutputError, match=shard_name(2, 3)):
            load_output_subset(str(folder), read_manifest(str(folder)), list(open_weights(str(folder / INDEX))
                                                                              .weight_map))


def test_a_tampered_index_is_refused(outputs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    reshard(outputs / "single", folder, 2)
    index = json.loads((folder / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard_name(2, 2) if index["weight_map"][key] == shard_name(1, 2) else shard_name(1, 2)
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptOutputError, match=INDEX):
        load_sparse(str(folder))
    with pytest.raises(CorruptOutputError, match="does not match"):           # and without the manifest
        load_weights(str(folder / INDEX))


def test_eval_and_export_read_sharded_outputs(outputs: Path, capsys) -> None:
    from cap_dist.cli import main
    from cap_dist.compact import load_compact

    assert main(["eval", str(outputs / "sharded"), "--no-dense"]) == 0
    sharded_metrics = json.loads(capsys.readouterr().out)
    assert main(["eval", str(outputs / "single"), "--no-dense"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == sharded_metrics["top1"]
    assert main(["export", str(outputs / "sharded")]) == 0
    capsys.readouterr()
    restored = {}
    for i in (1, 2, 3):
        restored.update(load_compact(str(outputs / "sharded" / f"model-{i:05d}-of-00003.compact.safetensors")))
    single = load_sparse(str(outputs / "single"))[0].state_dict()
    assert set(restored) == set(single) and all(torch.equal(restored[k], single[k]) for k in single)


def test_a_sharded_output_is_a_model_source(outputs: Path) -> None:
    """The next gradual step prunes the previous (sharded) output: checked from its headers, loaded whole by the
    local engine, read by ranges by the Ray engine's actors."""
    source = ModelSource.parse(str(outputs / "sharded"))
    assert source.ranged_weights == str(outputs / "sharded" / INDEX)
    source.check_weights()
    loaded = source.load().state_dict()
    single = load_sparse(str(outputs / "single"))[0].state_dict()
    assert all(torch.equal(loaded[k], single[k]) for k in single)
    step = prune(recipe_from_dict(_tree(outputs, "next", source=outputs / "sharded", sparsity=0.7)))
    assert step.sparsity == pytest.approx(0.7, abs=0.01)
    for key, before in single.items():
        if key.endswith("weight") and key.startswith("blocks."):
            assert not bool((step.model.state_dict()[key][before == 0] != 0).any()), key


def test_a_truncated_shard_of_a_model_source_is_named(outputs: Path, tmp_path: Path) -> None:
    from cap_dist.models.spec import ModelLoadError

    folder = tmp_path / "src"
    reshard(outputs / "single", folder, 2)
    victim = folder / shard_name(1, 2)
    victim.write_bytes(victim.read_bytes()[:-64])
    with pytest.raises(ModelLoadError, match=f"{shard_name(1, 2)} is truncated"):
        ModelSource.parse(str(folder)).check_weights()


def test_shard_ownership_and_row_ranges_are_pure_rules() -> None:
    held = [["a", "head", "bn.mean"], ["b"], ["c", "head", "bn.mean"]]
    assert shard_owners(held, [["bn.mean"], [], []]) == [["a", "bn.mean"], ["b"], ["c", "head"]]
    with pytest.raises(ValueError, match="does not hold"):
        shard_owners(held, [[], ["bn.mean"], []])
    assert [fsdp_rows(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [fsdp_rows(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    for rows, world in ((7, 3), (64, 4), (3, 5)):            # torch.chunk is what FSDP2's Shard(0) follows
        chunks = torch.arange(rows).chunk(world)
        got = [fsdp_rows(rows, r, world) for r in range(world)]
        assert [b - a for a, b in got][:len(chunks)] == [len(c) for c in chunks]
    owned = assign_tensors([("a", 10), ("b", 10), ("c", 60), ("d", 20)], 2)
    assert owned == [["a", "b"], ["c", "d"]]
    assert [k for part in assign_tensors([(str(i), i + 1) for i in range(9)], 3) for k in part] == \
        [str(i) for i in range(9)]


def test_a_missing_single_file_is_named(outputs: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(outputs / "single", tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(CorruptOutputError, match="model.safetensors is missing"):
        load_sparse(str(tmp_path / "out"))
