"""The worker loop's pieces in one process (a gloo group of one rank, FSDP2 still wrapping every block), without
Ray: an encoder distilled on embeddings, and the sharded evaluation against cap_dist.eval's own numbers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.distributed as dist

from cap_dist.eval import evaluate_model
from cap_dist.finetune.checkpoint import TrainState
from cap_dist.config import FinetuneConfig
from cap_dist.finetune.loop import Worker, build_optimizer, evaluate_sharded, shard_model, train_epoch
from cap_dist.models.kind import model_kind
from cap_dist.finetune.masks import masks_from_model, shard_masks
from cap_dist.finetune.schedule import linear_schedule

pytestmark = pytest.mark.timeout(120)

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
LAYERS = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Worker:
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield Worker(0, 1, torch.device("cpu"), init_device_mesh("cpu", (1,)))
    finally:
        dist.destroy_process_group()


def _pruned_pair(num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = timm.models.VisionTransformer(num_classes=num_classes, **VIT).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for name in LAYERS:
            w = student.get_submodule(name).weight
            w[w.abs() <= w.abs().flatten().median()] = 0.0
    teacher.requires_grad_(False)
    return student, teacher


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, classes: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def test_encoder_distils_on_embeddings_with_exact_masks(worker: Worker) -> None:
    student, teacher = _pruned_pair(num_classes=0)
    assert model_kind(student) == "encoder" and model_kind(teacher) == "encoder"
    ft = FinetuneConfig(data={"uri": "-"}, lr=2e-3, weight_decay=0.1, distill={"weight": 1.0,
                                                                              "feature_loss": "cosine"})
    masks = masks_from_model(student, LAYERS)
    shard_model(student, worker.mesh, ft)
    shard_model(teacher, worker.mesh, ft)
    masked = shard_masks(masks, dict(student.named_parameters()))
    data = _Images(32, 4)
    loader = [(data.x[i:i + 8], torch.full((8,), -1)) for i in range(0, 32, 8)]
    optimizer = build_optimizer(student, ft)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(12))
    state = TrainState()
    before = evaluate_sharded(student, teacher, (data, list(range(32))), 16, "encoder", worker)
    losses = [train_epoch(student, teacher, masked, loader, optimizer, scheduler, state, 12, ft, "encoder",
                          worker, None)["distill_loss"] for _ in range(3)]
    after = evaluate_sharded(student, teacher, (data, list(range(32))), 16, "encoder", worker)
    assert state.step == 12
    assert losses[-1] < 0.7 * losses[0]
    assert after["eval_cosine"] > before["eval_cosine"]
    assert masked.violations() == {}
    for name, mask in masks.items():
        weight = student.get_parameter(name).full_tensor()
        assert torch.equal(weight == 0, ~mask), name


def test_sharded_evaluation_equals_cap_dist_eval(worker: Worker) -> None:
    student, teacher = _pruned_pair(num_classes=4)
    expected = evaluate_model(student, [(_Images(20, 4).x[i:i + 7], _Images(20, 4).y[i:i + 7])
                                        for i in range(0, 20, 7)], dense_model=teacher)
    ft = FinetuneConfig(data={"uri": "-"})
    shard_model(student, worker.mesh, ft)
    shard_model(teacher, worker.mesh, ft)
    got = evaluate_sharded(student, teacher, (_Images(20, 4), list(range(20))), 7, "classifier", worker)
    assert got["eval_top1"] == pytest.approx(expected["top1"])
    assert got["eval_agreement"] == pytest.approx(expected["agreement"])
    assert got["eval_kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("how", ["sharded", "rank0"])
def test_meta_build_loads_the_weights_and_masks_exactly(worker: Worker, tmp_path, how: str) -> None:
    """Built on meta and filled from a file (ranged reads of each rank's rows, or rank 0's broadcast), the sharded
    model equals the saved one tensor for tensor, and the masks taken from its local rows are the saved zeros."""
    from cap_dist.finetune.masks import local_masks
    from cap_dist.finetune.sharded_io import broadcast_from_rank0, build_sharded, write_rank_shard
    from cap_dist.shards import load_weights, write_safetensors

    student, _ = _pruned_pair(num_classes=4)
    expected = {k: v.clone() for k, v in student.state_dict().items()}
    write_safetensors(str(tmp_path / "model.safetensors"), expected)
    ft = FinetuneConfig(data={"uri": "-"})
    build = lambda: timm.models.VisionTransformer(num_classes=4, **VIT)  # noqa: E731
    shard = lambda m: shard_model(m, worker.mesh, ft)  # noqa: E731
    if how == "sharded":
        model = build_sharded(build, shard, worker.device, str(tmp_path / "model.safetensors"))
    else:
        model = broadcast_from_rank0(build, shard, worker.device, worker.rank,
                                     lambda: load_weights(str(tmp_path / "model.safetensors")))
    for key, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.equal(full, expected[key]), key
    masked = local_masks(model, LAYERS)
    assert [name for name, _, _ in masked.params] == [f"{n}.weight" for n in LAYERS]
    for name, _, mask in masked.params:
        assert torch.equal(mask, expected[name] != 0) and 0.4 < float((~mask).float().mean()) < 0.6, name
    written = write_rank_shard(model, str(tmp_path / "out"), worker.rank, worker.world)
    assert written.name == "model-00001-of-00001.safetensors"
    again = load_weights(str(tmp_path / "out" / written.name))
    assert set(again) == set(expected) and all(torch.equal(again[k], expected[k]) for k in expected)
