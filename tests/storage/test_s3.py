"""Models, data and outputs on a real S3 protocol server (moto on 127.0.0.1): the whole prune pipeline, the Ray
engine's actors, pyarrow's native client, and the errors a user meets (wrong keys, missing bucket or key,
corrupted objects, interrupted writes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save

from cap_dist import storage
from cap_dist.config import load_recipe, recipe_from_dict
from cap_dist.data.parquet import ParquetImageDataset, write_image_parquet
from cap_dist.output import CorruptOutputError, load_sparse, read_report
from cap_dist.engines import prune

VIT_KWARGS = {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 2.0}
INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_assets(root: str) -> None:
    """A tiny ViT model folder, a Parquet calibration table and a class-folder evaluation set under ``root``."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(**VIT_KWARGS)
    storage.atomic_write_bytes(f"{root}/vit/model.safetensors",
                               save({k: v.contiguous() for k, v in model.state_dict().items()}))
    storage.atomic_write_bytes(f"{root}/vit/model.json", json.dumps(
        {"architecture": "timm:VisionTransformer", "create_kwargs": VIT_KWARGS, "input": INPUT}).encode())
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(4):
        for i in range(10):
            pixels = (rng.random((40, 40, 3)) * 60 + label * 60).astype(np.uint8)
            images.append(_png(pixels))
            labels.append(label)
            if i < 3:
                storage.atomic_write_bytes(f"{root}/eval/class{label}/{i}.png", images[-1])
    write_image_parquet(f"{root}/calib.parquet", images, labels, row_group_size=8)


def tree(root: str, out: str, engine: str = "local") -> dict:
    return {"model": {"source": f"{root}/vit"},
            "calibration": {"uri": f"{root}/calib.parquet", "samples": 32, "batch_size": 8},
            "evaluation": {"uri": f"{root}/eval"},
            "prune": {"method": "cap", "sparsity": 0.5, "block_size": 16},
            "output": out, "device": "cpu", "engine": engine, "distributed": {"actors": 2}}


@pytest.fixture
def assets_on_s3(s3: str) -> str:
    upload_assets(s3)
    return s3


def test_prune_pipeline_reads_and_writes_s3(assets_on_s3: str, tmp_path: Path) -> None:
    root = assets_on_s3
    report = prune(recipe_from_dict(tree(root, f"{root}/out")))
    model, manifest = load_sparse(f"{root}/out")
    assert manifest["sparsity"] == pytest.approx(0.5)
    for name, tensor in report.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert [r["layer"] for r in read_report(f"{root}/out")] == [r.layer for r in report.layers]
    fs = storage.fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/out".removeprefix("s3://")))
    assert names == ["model.json", "model.safetensors", "report.parquet", "sparsity.json"]   # no temporary keys

    # The same recipe on local copies of the same bytes gives bit-identical weights: S3 changes nothing.
    local = tmp_path / "assets"
    for key in fs.find(root.removeprefix("s3://")):
        target = local / key.split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(key))
    local_report = prune(recipe_from_dict(tree(str(local), str(tmp_path / "out"))), write=False)
    for name, tensor in local_report.model.state_dict().items():
        assert torch.equal(report.model.state_dict()[name], tensor), name


def test_parquet_on_s3_uses_pyarrows_native_client(assets_on_s3: str) -> None:
    import pyarrow.fs as pafs

    data = ParquetImageDataset(f"{assets_on_s3}/calib.parquet", INPUT)
    assert isinstance(data._arrow_fs, pafs.S3FileSystem)
    assert len(data) == 40 and data.labels.tolist()[:3] == [0, 0, 0]
    x, y = data[39]
    assert x.shape == (3, 32, 32) and y == 3
    fs, path = storage.arrow_filesystem(f"{assets_on_s3}/calib.parquet")
    assert fs.get_file_info(path).size > 0


def test_ray_actors_reach_s3_through_the_forwarded_endpoint(ray_cluster, assets_on_s3: str) -> None:
    """The shared Ray cluster was started before the S3 endpoint existed: only the driver's forwarding
    (runtime_env env_vars) can give the actors the endpoint."""

    root = assets_on_s3
    manifest = prune(recipe_from_dict(tree(root, f"{root}/ray-out", engine="ray"))).manifest
    threads = torch.get_num_threads()
    try:           # one thread, as each actor has: another count rounds float32 products, and near-tie masks, apart
        local = prune(recipe_from_dict(dict(tree(root, f"{root}/local-out"), threads=1)), write=False)
    finally:
        torch.set_num_threads(threads)
    model, _ = load_sparse(f"{root}/ray-out")
    assert manifest["engine"] == "ray" and len(manifest["actors"]) == 2
    for name, tensor in local.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    # The actors wrote their shards straight to S3; ranged reads of FSDP-style row blocks work there too, and a
    # tampered shard is named.
    from cap_dist.shards import INDEX, load_weight_subset

    assert manifest["weights"] == INDEX and {"model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors"} <= set(manifest["files"])
    key = "blocks.1.mlp.fc1.weight"
    rows = load_weight_subset(f"{root}/ray-out/{INDEX}", [key], {key: (5, 20)})[key]
    assert torch.equal(rows, model.state_dict()[key][5:20])
    client_fs = storage.fsspec.filesystem("s3")
    shard = f"{root}/ray-out/model-00002-of-00002.safetensors".removeprefix("s3://")
    data = bytearray(client_fs.cat_file(shard))
    data[-9] ^= 0xFF
    client_fs.pipe_file(shard, bytes(data))
    with pytest.raises(CorruptOutputError, match="model-00002-of-00002.safetensors is corrupt"):
        load_sparse(f"{root}/ray-out")


def test_missing_bucket_and_missing_key_are_named(s3: str) -> None:
    with pytest.raises(storage.MissingObjectError, match="bucket 'no-such-bucket-capdist' does not exist"):
        storage.read_bytes("s3://no-such-bucket-capdist/model/model.json")
    with pytest.raises(FileNotFoundError, match=f"{s3}/nothing/here.json does not exist"):
        storage.read_bytes(f"{s3}/nothing/here.json")
    recipe = recipe_from_dict(tree(s3, f"{s3}/out"))            # nothing uploaded: the model folder is missing
    with pytest.raises(FileNotFoundError, match=f"{s3}/vit"):
        prune(recipe)
    assert not storage.fsspec.filesystem("s3").exists(f"{s3}/out/sparsity.json".removeprefix("s3://"))


def test_corrupted_objects_are_named(assets_on_s3: str) -> None:
    root = assets_on_s3
    prune(recipe_from_dict(tree(root, f"{root}/out")))
    client_fs = storage.fsspec.filesystem("s3")
    key = f"{root}/out/model.safetensors".removeprefix("s3://")
    data = bytearray(client_fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF                               # one flipped byte inside the tensor data
    client_fs.pipe_file(key, bytes(data))
    with pytest.raises(CorruptOutputError, match="model.safetensors"):
        load_sparse(f"{root}/out")
    # A corrupted input model (garbage where its weights should be) is a clear error, not a deep traceback.
    client_fs.pipe_file(f"{root}/vit/model.safetensors".removeprefix("s3://"), b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        prune(recipe_from_dict(tree(root, f"{root}/out2")), write=False)


def test_interrupted_write_leaves_no_finished_looking_output(assets_on_s3: str, monkeypatch) -> None:
    import cap_dist.output as output

    root = assets_on_s3
    real_write = output.atomic_write_bytes

    def failing_write(uri: str, data: bytes) -> None:
        if uri.endswith("report.parquet"):
            raise ConnectionError("network dropped mid-job")
        real_write(uri, data)

    monkeypatch.setattr(output, "atomic_write_bytes", failing_write)
    with pytest.raises(ConnectionError):
        prune(recipe_from_dict(tree(root, f"{root}/crash")))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no finished pruning output: sparsity.json is missing"):
        load_sparse(f"{root}/crash")


def test_recipe_itself_can_live_on_s3(assets_on_s3: str) -> None:
    import yaml

    storage.atomic_write_bytes(f"{assets_on_s3}/recipe.yaml", yaml.safe_dump(tree(assets_on_s3, "x")).encode())
    recipe = load_recipe(f"{assets_on_s3}/recipe.yaml", ["prune.sparsity=0.6"])
    assert recipe.prune.sparsity == 0.6 and recipe.model.source == f"{assets_on_s3}/vit"


def test_wrong_credentials_are_refused_with_a_clear_error(monkeypatch) -> None:
    from tests.s3server import start_s3_server

    server = start_s3_server(auth=True)
    try:
        server.client().create_bucket(Bucket="cap-dist-auth")
        server.client().put_object(Bucket="cap-dist-auth", Key="model/model.json", Body=b"{}")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        storage.configure()
        assert storage.read_bytes("s3://cap-dist-auth/model/model.json") == b"{}"      # the right keys work
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        storage.configure()
        with pytest.raises(storage.AccessDeniedError, match="access denied.*AWS_ACCESS_KEY_ID"):
            storage.read_bytes("s3://cap-dist-auth/model/model.json")
        with pytest.raises(PermissionError, match="cap-dist-auth/out/x.bin: access denied"):
            storage.atomic_write_bytes("s3://cap-dist-auth/out/x.bin", b"x")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        storage.configure()
        with pytest.raises(storage.AccessDeniedError):
            prune(recipe_from_dict(tree("s3://cap-dist-auth", "s3://cap-dist-auth/out")))
    finally:
        monkeypatch.undo()
        storage.configure()
        server.stop()


def test_ray_train_storage_gets_the_endpoint(s3: str, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    path, fs = storage.ray_train_storage(f"{s3}/runs")
    assert path == f"{s3.removeprefix('s3://')}/runs" and isinstance(fs, pafs.S3FileSystem)
    with fs.open_output_stream(f"{path}/probe.txt") as f:                # reaches the local server, not AWS
        f.write(b"ok")
    assert storage.read_bytes(f"{s3}/runs/probe.txt") == b"ok"
    assert storage.ray_train_storage(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)


def test_cli_reports_storage_errors_in_one_line(s3: str, capsys) -> None:
    from cap_dist.cli import main

    storage.atomic_write_bytes(f"{s3}/recipe.yaml", json.dumps(tree("s3://no-such-bucket-capdist", "out")).encode())
    assert main(["prune", "--config", f"{s3}/recipe.yaml", "engine=local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cap-dist prune: error: s3://no-such-bucket-capdist/vit")
    assert "does not exist" in err[-1]
