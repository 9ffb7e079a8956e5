"""Sharded checkpoints of a finetune run, through Ray Train's storage.

Each rank writes only its own shards with torch distributed checkpoint (``dcp.save`` of
``get_state_dict(model, optimizer)``) into a local temporary folder, and every rank passes its folder to
``ray.train.report``: Ray Train merges the folders into one checkpoint directory of the run on its
``storage_path`` (local or S3). Rank 0 adds ``trainer_state.json`` (epoch, optimizer step, attempt, the
scheduler and the per-epoch metrics so far), so a restarted run continues its counters and its metrics table
instead of starting again. After a worker failure, Ray Train restarts the worker group and
``ray.train.get_checkpoint()`` hands every rank the latest checkpoint; DCP reshards on load, so the worker
count may even change between attempts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_FILE = "trainer_state.json"

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that must survive a restart for the run to end at the right step.

    Attributes:
        epoch: epochs completed.
        step: optimizer steps completed.
        attempt: 0 for the first start, +1 for every resume from a checkpoint.
        history: one metrics row per completed epoch (what ``metrics.parquet`` holds).
        scheduler: the LR scheduler's ``state_dict()``.
        resumed_from_step: the step the latest attempt resumed at (None on a fresh start).
    """

    epoch: int = 0
    step: int = 0
    attempt: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
                    metrics: dict[str, Any], rank: int) -> None:
    """Write this rank's shards and (rank 0) the trainer state, and report them with ``metrics``.

    Every rank must call this at the same point: ``dcp.save`` plans collectively and ``ray.train.report`` is
    a barrier. The local folder is removed once Ray Train has copied it to storage.
    """
    import ray.train

    folder = tempfile.mkdtemp(prefix="cap-dist-ckpt-")
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
        if rank == 0:
            state.scheduler = scheduler.state_dict()
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch{state.epoch:04d}_step{state.step:08d}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    wait_until_committed()


def wait_until_committed(timeout_s: float = 600.0) -> None:
    """Block until Ray Train has registered the checkpoint just reported.

    Why: Ray Train V2 registers a checkpoint when its controller next polls the workers' reports. A worker that
    dies right after ``report`` (before that poll) takes its report with it, and the restart would resume from
    the checkpoint before — losing a whole ``checkpoint_every`` of work, and making the resume point depend on
    timing. Waiting (at most one poll interval) makes every reported checkpoint the resume point. Older Ray
    Train (V1) has no such call and registers synchronously.
    """
    import ray.train

    wait = getattr(ray.train, "get_all_reported_checkpoints", None)
    mode = getattr(getattr(ray.train, "CheckpointConsistencyMode", None), "COMMITTED", None)
    if wait is None or mode is None:
        return
    try:
        wait(consistency_mode=mode, timeout_s=timeout_s)
    except Exception as err:  # a slow controller must not fail training; the checkpoint may still land
        log.warning("could not confirm that the checkpoint was committed (%s: %s)", type(err).__name__, err)


def load_checkpoint(checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> TrainState:
    """Restore the sharded model and optimizer, the scheduler and the counters from a reported checkpoint.

    Raises:
        ValueError: the checkpoint lacks the trainer state (it was not written by :func:`save_checkpoint`).
    """
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {checkpoint.path} has no {STATE_FILE}; it was not written by a cap-dist "
                             "finetune run (use another run name or storage_path)")
        with open(path) as f:
            raw = json.load(f)
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    state = TrainState(**raw)
    if state.scheduler:
        scheduler.load_state_dict(state.scheduler)
    return state
