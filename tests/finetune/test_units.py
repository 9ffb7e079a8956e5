"""The pure parts of sparse recovery, without Ray: masks (plain and FSDP2-sharded), losses, the LR schedule,
training-data selection and augmentation, and the result files."""

from __future__ import annotations

import io
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cap_dist.finetune.data import LightAugment, draw_indices, eval_shard
from cap_dist.finetune.losses import (
    NoLabelsError,
    combined_loss,
    feature_distillation,
    label_loss,
    logit_distillation,
)
from cap_dist.finetune.masks import (
    MaskViolationError,
    check_masks,
    layer_names_from_manifest,
    masks_from_model,
    shard_masks,
)
from cap_dist.finetune.results import curves_png_bytes, layer_rows, metrics_table_bytes
from cap_dist.finetune.schedule import cyclic_lr_multiplier, linear_schedule, lr_multiplier

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------------------------- masks


def _sparse_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 5))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w[w.abs() <= w.abs().flatten().median()] = 0.0
    return model


def _train_masked(model: nn.Module, masked, steps: int, weight_decay: float = 0.1) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=weight_decay)
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
        F.cross_entropy(model(x), y).backward()
        masked.mask_gradients_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        masked.mask_optimizer_state_(optimizer)
        masked.apply_masks_()
    return optimizer


def test_masks_survive_adamw_with_weight_decay_exactly() -> None:
    model = _sparse_mlp()
    masks = masks_from_model(model, ["0", "2"])
    before = {k: model.get_parameter(k).detach().clone() for k in masks}
    masked = shard_masks(masks, dict(model.named_parameters()))
    optimizer = _train_masked(model, masked, steps=25)
    for name, mask in masks.items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name       # exactly 0.0
        assert not torch.equal(weight[mask], before[name][mask]), name                  # kept weights trained
        state = optimizer.state[model.get_parameter(name)]
        assert bool((state["exp_avg"][~mask] == 0).all()) and bool((state["exp_avg_sq"][~mask] == 0).all())
    assert masked.violations() == {}
    check_masks(dict(model.state_dict()), masks)


def test_without_masks_adamw_revives_pruned_weights() -> None:
    """The control: the same steps without masking move the pruned weights (so the test above means something)."""
    model = _sparse_mlp()
    masks = masks_from_model(model, ["0", "2"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(MaskViolationError, match="no longer zero"):
        check_masks(dict(model.state_dict()), masks)


def test_optimizer_state_masking_stops_stale_momentum() -> None:
    """Momentum from before the masks (a resumed or re-pruned optimizer) is zeroed at pruned positions."""
    model = _sparse_mlp()
    masks = masks_from_model(model, ["0"])
    masked = shard_masks(masks, dict(model.named_parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    param = model.get_parameter("0.weight")
    optimizer.state[param] = {"step": torch.tensor(3.0), "exp_avg": torch.ones_like(param),
                              "exp_avg_sq": torch.ones_like(param)}
    masked.mask_optimizer_state_(optimizer)
    assert bool((optimizer.state[param]["exp_avg"][~masks["0.weight"]] == 0).all())
    assert bool((optimizer.state[param]["exp_avg"][masks["0.weight"]] == 1).all())


def test_mask_errors_name_the_problem() -> None:
    model = _sparse_mlp()
    with pytest.raises(ValueError, match="not a weighted module"):
        masks_from_model(model, ["missing"])
    with pytest.raises(ValueError, match="name no parameter"):
        shard_masks({"x.weight": torch.ones(2, 2, dtype=torch.bool)}, dict(model.named_parameters()))
    assert layer_names_from_manifest({"layers": [{"layer": "a"}, {"layer": "b"}]}) == ["a", "b"]


def _fsdp_masked_steps(rank: int, world: int, init_file: str, results: str) -> None:
    """One rank of an FSDP2 run on gloo: masks sharded like their DTensors, AdamW with weight decay."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _sparse_mlp()
        masks = masks_from_model(model, ["0", "2"])
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = dict(model.named_parameters())
        masked = shard_masks(masks, params)
        assert type(params["0.weight"]).__name__ == "DTensor"
        local = sum(m.numel() for _, _, m in masked.params)
        _train_masked(model, masked, steps=10)
        assert masked.violations() == {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            check_masks(full, masks)
            torch.save({"local": local, "total": sum(m.numel() for m in masks.values())}, results)
    finally:
        dist.destroy_process_group()


def test_masks_shard_like_fsdp2_parameters_on_two_gloo_ranks(tmp_path) -> None:
    """Rows of 10 and 5 over 2 ranks: every rank holds its own part of each mask, and after 10 AdamW steps with
    weight decay the gathered weights are exactly zero where pruned."""
    import torch.multiprocessing as mp

    init_file, results = str(tmp_path / "pg"), str(tmp_path / "r.pt")
    mp.start_processes(_fsdp_masked_steps, args=(2, init_file, results), nprocs=2, join=True, start_method="spawn")
    out = torch.load(results)
    assert out["local"] < out["total"]                       # rank 0 holds a shard, not the whole mask


# ---------------------------------------------------------------------------------------------------- losses


def test_logit_distillation_matches_hand_computed_kl_times_t_squared() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    for temperature in (1.0, 2.0, 4.0):
        p = torch.softmax(t / temperature, dim=1)
        q = torch.softmax(s / temperature, dim=1)
        expected = (p * (p.log() - q.log())).sum(dim=1).mean() * temperature**2
        torch.testing.assert_close(logit_distillation(s, t, temperature), expected, rtol=1e-5, atol=1e-6)
    assert float(logit_distillation(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_the_gradient_scale() -> None:
    """d(KL·T²)/ds = T·(softmax(s/T) − softmax(t/T)) ≈ (s − t)_centred / classes for large T: the T² makes the
    gradient independent of the temperature (without it, doubling T would quarter it)."""
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    norms = []
    for temperature in (4.0, 8.0):
        s = torch.randn(8, 10, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        logit_distillation(s, t, temperature).backward()
        norms.append(float(s.grad.norm()))
    assert norms[0] / norms[1] == pytest.approx(1.0, rel=0.1)


def test_feature_losses() -> None:
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(feature_distillation(a, b, "mse"), ((a - b) ** 2).mean())
    torch.testing.assert_close(feature_distillation(a, b, "cosine"), (1 - F.cosine_similarity(a, b)).mean())
    assert float(feature_distillation(a, 3 * a, "cosine")) == pytest.approx(0.0, abs=1e-6)


def test_combined_loss_weights_and_unlabelled_rows() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, -1, 2, -1])
    parts = combined_loss(s, t, y, weight=0.25, temperature=2.0)
    expected = 0.25 * logit_distillation(s, t, 2.0) + 0.75 * F.cross_entropy(s[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(parts.loss, expected)
    assert float(label_loss(s, torch.full((4,), -1))) == 0.0          # an all-unlabelled batch adds nothing
    only = combined_loss(s, t, None, weight=1.0, temperature=2.0)      # label-free: distillation alone
    torch.testing.assert_close(only.loss, logit_distillation(s, t, 2.0))
    with pytest.raises(NoLabelsError, match="no labels"):
        combined_loss(s, t, None, weight=0.5, temperature=2.0)
    with pytest.raises(NoLabelsError, match="encoder"):
        combined_loss(s, t, y, weight=0.5, temperature=2.0, kind="encoder")


# ---------------------------------------------------------------------------------------------------- schedule


def test_linear_warmup_then_linear_decay_to_min() -> None:
    values = [lr_multiplier(k, total_steps=10, warmup_steps=2, min_ratio=0.1) for k in range(10)]
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[2] == pytest.approx(1.0)
    steps = [values[k] - values[k + 1] for k in range(2, 9)]
    assert steps == pytest.approx([0.9 / 8] * 7)                       # linear, reaching 0.1 at step 10
    assert lr_multiplier(10, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 10, 2, 0.1) == pytest.approx(0.1)
    assert [lr_multiplier(k, 4) for k in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_schedule_restarts_every_pruning_step_and_drives_lambda_lr() -> None:
    cycle = [cyclic_lr_multiplier(k, 5, warmup_steps=1) for k in range(15)]
    assert cycle[0:5] == cycle[5:10] == cycle[10:15]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(4, 1, 0.0))
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2, 0.2, 0.2 * 2 / 3, 0.2 / 3])
    with pytest.raises(ValueError, match="total_steps"):
        linear_schedule(0)


# ---------------------------------------------------------------------------------------------------- data


class _Cfg:
    def __init__(self, subset=None, samples=None, seed=0, uri="mem") -> None:
        self.subset, self.samples, self.seed, self.uri = subset, samples, seed, uri


def test_draw_indices_subset_and_seeded_samples() -> None:
    assert draw_indices(_Cfg(), 5) == [0, 1, 2, 3, 4]
    picked = draw_indices(_Cfg(subset=(10, 20), samples=4, seed=3), 100)
    assert picked == draw_indices(_Cfg(subset=(10, 20), samples=4, seed=3), 100)
    assert len(picked) == 4 and all(10 <= i < 20 for i in picked)
    with pytest.raises(ValueError, match="outside"):
        draw_indices(_Cfg(subset=(0, 200)), 100)
    with pytest.raises(ValueError, match="only 10 items"):
        draw_indices(_Cfg(subset=(0, 10), samples=11), 100)


def test_light_augmentation_keeps_shape_and_flips_only_when_asked() -> None:
    torch.manual_seed(0)
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16)
    for _ in range(20):
        top, left, h, w = LightAugment(flip=False).crop_box(16, 16)
        assert 0.8 * 256 * 0.85 <= h * w <= 256 and top + h <= 16 and left + w <= 16
    assert LightAugment(flip=True)(image).shape == image.shape
    no_flip = LightAugment(flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(no_flip(image), image)                       # whole-image crop, no flip: unchanged
    flip = LightAugment(flip=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    outs = {bool(torch.equal(flip(image), image.flip(-1))) for _ in range(30)}
    assert outs == {True, False}


def test_eval_shards_cover_every_item_once_with_equal_batch_counts() -> None:
    for n, batch, world in ((10, 3, 2), (5, 4, 3), (1, 8, 2), (7, 2, 4)):
        shards = [eval_shard(n, batch, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1
        seen = sorted(p for s in shards for b in s if b for p in b)
        assert seen == list(range(n))


# ---------------------------------------------------------------------------------------------------- results


def test_metrics_table_and_curves() -> None:
    history = [{"epoch": e, "step": 4 * (e + 1), "train_loss": 1.0 / (e + 1), "distill_loss": 0.5,
                "label_loss": 0.2, "lr": 1e-3, "eval_top1": None if e == 0 else 0.5 + 0.1 * e, "seconds": 1.0}
               for e in range(3)]
    table = pq.read_table(io.BytesIO(metrics_table_bytes(history)))
    assert table.column("step").to_pylist() == [4, 8, 12]
    assert table.column("eval_top1").to_pylist()[0] is None
    png = curves_png_bytes(history)
    assert png.startswith(b"\x89PNG")


def test_layer_rows_measure_sparsity_of_the_trained_weights() -> None:
    state = {"a.weight": torch.tensor([[0.0, 1.0], [0.0, 2.0]]), "b.weight": torch.tensor([[0.0, 0.0, 0.0, 3.0]])}
    zeros = {k: (int((v == 0).sum()), v.numel()) for k, v in state.items()}
    rows = layer_rows([{"layer": "a", "numel": 4, "sparsity": 0.4, "loss": 1.0}], zeros)
    assert rows[0] == {"layer": "a", "numel": 4, "sparsity": 0.5, "loss": 1.0}
    assert rows[1]["layer"] == "b" and rows[1]["sparsity"] == pytest.approx(0.75)
    assert math.isclose(sum(r["numel"] for r in rows), 8)


# ---------------------------------------------------------------------------------------------------- CLI, config


def test_cli_parses_finetune() -> None:
    from cap_dist.cli import _cmd_finetune, build_parser
    from cap_dist.finetune.trainer import default_output

    args = build_parser().parse_args(["finetune", "--config", "r.yaml", "--student", "runs/x/", "finetune.epochs=2"])
    assert args.func is _cmd_finetune and args.overrides == ["finetune.epochs=2"] and args.output is None
    assert default_output("runs/x/") == "runs/x-finetuned"


def test_cpu_offload_needs_gpus() -> None:
    from cap_dist.config import FinetuneConfig

    with pytest.raises(ValueError, match="cpu_offload=true .* needs use_gpu=true"):
        FinetuneConfig(data={"uri": "x"}, cpu_offload=True)
    assert FinetuneConfig(data={"uri": "x"}, cpu_offload=True, use_gpu=True).cpu_offload
