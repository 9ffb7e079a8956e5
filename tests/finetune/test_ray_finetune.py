"""Sparse recovery on Ray Train with 2 CPU workers (FSDP2 over gloo), on a small random ViT pruned to 50 %:
masks survive the steps exactly, the loss falls on a learnable task, and a worker killed mid-run costs only
the steps since the last checkpoint — on the one local Ray cluster of the test run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cap_dist.config import recipe_from_dict
from cap_dist.data.parquet import write_image_parquet
from cap_dist.finetune.trainer import FinetuneError, finetune
from cap_dist.output import load_sparse, read_manifest, read_verified
from cap_dist.engines import prune
from tests.dense_models import write_dense_vit

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channels": 3}
VIT = {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
       "mlp_ratio": 2.0}
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.float64)
EPOCHS, STEPS_PER_EPOCH = 3, 4                      # 128 images / (2 workers × 16 per batch)


def _image(rng: np.random.Generator, label: int) -> np.ndarray:
    """A noisy 36 px square tinted by its class: learnable from colour alone."""
    pixels = COLOURS[label] + rng.normal(0, 40, (36, 36, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A random ViT (the dense teacher), 128 training images as Parquet, 32 evaluation images in class
    folders, and the ViT pruned to 50 % by the local pipeline (the student)."""
    root = tmp_path_factory.mktemp("finetune")
    write_dense_vit(root / "dense", VIT, INPUT)
    rng = np.random.default_rng(0)
    labels = [i % 4 for i in range(128)]
    write_image_parquet(str(root / "train.parquet"), [_png(_image(rng, y)) for y in labels], labels)
    for i in range(32):
        folder = root / "eval" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, i % 4)).save(folder / f"{i}.png")
    prune(recipe_from_dict(_tree(root, "pruned")))
    return root


def _tree(root: Path, name: str, **finetune_cfg) -> dict:
    return {"model": {"source": str(root / "dense")},
            "calibration": {"uri": str(root / "eval"), "samples": 8, "batch_size": 8},
            "evaluation": {"uri": str(root / "eval"), "batch_size": 16},
            "prune": {"method": "magnitude", "sparsity": 0.5},
            "output": str(root / name), "engine": "local", "device": "cpu",
            "finetune": {"data": {"uri": str(root / "train.parquet"), "batch_size": 16}, "epochs": EPOCHS,
                         "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.1, "distill": {"weight": 0.5},
                         "workers": 2, "max_failures": 2, "checkpoint_every": 1, **finetune_cfg}}


def _pruned(state: dict[str, torch.Tensor], manifest: dict) -> dict[str, torch.Tensor]:
    return {f"{row['layer']}.weight": state[f"{row['layer']}.weight"] for row in manifest["layers"]}


def _check_output(assets: Path, output: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The finetuned output loads and verifies; its pruned weights are exactly zero where the student's are,
    and its kept weights moved."""
    student, student_manifest = load_sparse(str(assets / "pruned"))
    model, manifest = load_sparse(str(output))                  # verifies model.safetensors' sha256
    for name in ("metrics.parquet", "curves.png", "report.parquet"):
        read_verified(str(output), name, manifest)              # listed in the manifest, checksums match
    before, after = _pruned(student.state_dict(), student_manifest), _pruned(model.state_dict(), manifest)
    assert len(before) == 8                                     # qkv, proj, fc1, fc2 of 2 blocks
    for name, weight in before.items():
        pruned = weight == 0
        assert 0.45 < float(pruned.float().mean()) < 0.55, name
        assert torch.equal(after[name][pruned], torch.zeros_like(after[name][pruned])), name
        assert not torch.equal(after[name][~pruned], weight[~pruned]), name
        assert torch.equal(after[name] == 0, pruned), name     # no kept weight became zero either
    assert manifest["sparsity"] == pytest.approx(student_manifest["sparsity"])
    assert manifest["engine"] == "ray"                          # written by a Ray Train group
    history = pq.read_table(output / "metrics.parquet").to_pylist()
    return model.state_dict(), history


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, assets: Path) -> dict:
    recipe = recipe_from_dict(_tree(assets, "run-a", storage_path=str(assets / "train-a")))
    summary = finetune(recipe, str(assets / "pruned"), str(assets / "finetuned-a"), sparsity=0.5)
    return summary


def test_masks_survive_fsdp2_steps_and_loss_falls(assets: Path, uninterrupted: dict) -> None:
    summary = uninterrupted
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["epochs"] == EPOCHS
    assert summary["attempts"] == 1 and summary["resumed_from_step"] is None
    _, history = _check_output(assets, assets / "finetuned-a")
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert [row["step"] for row in history] == [4, 8, 12]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["label_loss"] < 0.8 * history[0]["label_loss"]
    assert all(row["eval_top1"] is not None for row in history)
    assert history[-1]["eval_top1"] >= 0.5                          # 4 colour classes: chance is 0.25
    manifest = read_manifest(str(assets / "finetuned-a"))
    assert manifest["finetune"]["steps"] == 12 and manifest["finetune"]["target_sparsity"] == 0.5
    assert (assets / "finetuned-a" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, assets: Path, uninterrupted: dict) -> None:
    """Rank 1 dies after step 6 (epoch 1; the last checkpoint is epoch 0's, step 4): Ray Train restarts the
    workers, they load that checkpoint, and the run ends at step 12 with the same weights as the run that was
    never interrupted."""
    marker = assets / "killed-once"
    recipe = recipe_from_dict(_tree(assets, "run-b", storage_path=str(assets / "train-b")))
    summary = finetune(recipe, str(assets / "pruned"), str(assets / "finetuned-b"), sparsity=0.5,
                       inject_failure={"step": STEPS_PER_EPOCH + 2, "rank": 1, "marker": str(marker)})
    assert marker.exists()                                          # the worker really was killed
    assert summary["attempts"] == 2 and summary["resumed_from_step"] == STEPS_PER_EPOCH
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH
    state, history = _check_output(assets, assets / "finetuned-b")
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert [row["attempt"] for row in history] == [0, 1, 1]         # epoch 0 from before the kill, kept
    assert [row["step"] for row in history] == [4, 8, 12]
    reference, _ = load_sparse(str(assets / "finetuned-a"))
    for key, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    checkpoints = sorted(p.name for p in (assets / "train-b").glob("*/checkpoint_epoch*"))
    assert len(checkpoints) == 2                                    # keep_checkpoints


def test_rerun_of_a_finished_run_resumes_its_last_checkpoint(ray_cluster, assets: Path, uninterrupted: dict) -> None:
    """The run name is stable: the same recipe and student find the finished run's checkpoints (a driver that
    crashed after training would not train again) and write the same weights without another step."""
    recipe = recipe_from_dict(_tree(assets, "run-a", storage_path=str(assets / "train-a")))
    summary = finetune(recipe, str(assets / "pruned"), str(assets / "finetuned-a2"), sparsity=0.5)
    assert summary["run_name"] == uninterrupted["run_name"]
    assert summary["resumed_from_step"] == EPOCHS * STEPS_PER_EPOCH == summary["steps"]
    first, _ = load_sparse(str(assets / "finetuned-a"))
    again, _ = load_sparse(str(assets / "finetuned-a2"))
    for key, tensor in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    assert pq.read_table(assets / "finetuned-a2" / "metrics.parquet").num_rows == EPOCHS


@pytest.mark.s3
def test_checkpoints_and_output_on_s3_survive_a_killed_worker(ray_cluster, s3: str, assets: Path,
                                                              tmp_path: Path) -> None:
    """Ray Train's storage and the finetuned output on an S3 server (the endpoint reaches the workers through
    the driver): a worker killed in epoch 1 resumes from the checkpoint Ray Train wrote to S3."""
    import fsspec

    recipe = recipe_from_dict(_tree(assets, "run-s3", storage_path=f"{s3}/train", epochs=2))
    summary = finetune(recipe, str(assets / "pruned"), f"{s3}/finetuned",
                       inject_failure={"step": STEPS_PER_EPOCH + 1, "rank": 1, "marker": str(tmp_path / "killed")})
    assert summary["attempts"] == 2 and summary["resumed_from_step"] == STEPS_PER_EPOCH
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    student, student_manifest = load_sparse(str(assets / "pruned"))
    model, _ = load_sparse(f"{s3}/finetuned")
    for name, weight in _pruned(student.state_dict(), student_manifest).items():
        assert torch.equal(model.get_parameter(name) == 0, weight == 0), name
    fs, root = fsspec.core.url_to_fs(f"{s3}/train/{summary['run_name']}")
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(root)]
    assert "checkpoint_epoch0002_step00000008" in names
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"} <= {
        path.rsplit("/", 1)[-1] for path in fs.ls(f"{root}/checkpoint_epoch0002_step00000008")}


def test_refuses_a_run_the_cluster_cannot_hold(ray_cluster, assets: Path) -> None:
    recipe = recipe_from_dict(_tree(assets, "run-c", workers=8))
    with pytest.raises(FinetuneError, match="8 workers × 1.0 CPUs = 8 CPUs, but the Ray cluster has 4"):
        finetune(recipe, str(assets / "pruned"), str(assets / "finetuned-c"))
