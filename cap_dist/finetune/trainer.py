"""Launch one sparse-recovery run on Ray Train: a ``TorchTrainer`` whose workers run
:func:`cap_dist.finetune.loop.train_loop_per_worker` (FSDP2, masks kept, distillation).

    cap-dist finetune --config jobs/vit4mnist.yaml --student runs/vit4mnist-50           # local Ray, 2 workers
    from cap_dist.finetune.trainer import finetune
    summary = finetune(recipe, "runs/vit4mnist-50", "runs/vit4mnist-50-finetuned")

The run's name is stable (recipe hash, student checksum and pruning step), so the same command after a crash
of the driver finds the run's checkpoints on ``storage_path`` and continues; Ray Train itself restarts the
worker group after a worker failure (``finetune.max_failures`` times) from the latest checkpoint.

Ray 2.60 runs Ray Train V2 by default (``RAY_TRAIN_V2_ENABLED`` unset or 1): ``fit()`` raises
``TrainingFailedError`` when the run fails; the V1 path (``RAY_TRAIN_V2_ENABLED=0``) returns a result whose
``error`` is set. Both are turned into :class:`FinetuneError`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cap_dist.config import Recipe

log = logging.getLogger(__name__)


class FinetuneError(RuntimeError):
    """A finetune run that could not start or did not finish; says which run and why."""


def default_output(student_uri: str) -> str:
    """Where ``cap-dist finetune`` writes when not told: beside the student, ``<student>-finetuned``, so each
    folder stays one self-contained output."""
    return f"{student_uri.rstrip('/')}-finetuned"


def run_name(recipe: Recipe, student_manifest: dict[str, Any], step_index: int) -> str:
    """A name that is the same for the same recipe, student and pruning step, and differs otherwise (a rerun
    resumes its own checkpoints and never another student's)."""
    ft = recipe.finetune
    if ft is not None and ft.run_name:
        return f"{ft.run_name}-step{step_index}"
    from cap_dist.output import weights_digest

    student = (weights_digest(student_manifest) or "nosha")[:8]
    return f"finetune-{recipe.hash[:12]}-{student}-step{step_index}"


def _absolute(uri: str) -> str:
    """A local path made absolute (Ray Train workers run in the run's own working directory); URIs as given."""
    return uri if "://" in uri else os.path.abspath(uri)


def _storage_root(recipe: Recipe) -> str:
    ft = recipe.finetune
    return _absolute(ft.storage_path if ft is not None and ft.storage_path else f"{recipe.output.rstrip('/')}/train")


def _storage_filesystem(recipe: Recipe, uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem or None, storage_path)`` for Ray Train's ``RunConfig``: local paths as they are
    (Ray's own filesystem), object stores through :func:`cap_dist.storage.ray_train_storage`, which hands Ray
    pyarrow's S3 client with the recipe's ``storage.endpoint_url`` (MinIO, a test server) and the path without
    its scheme."""
    from cap_dist.storage import ray_train_storage

    path, filesystem = ray_train_storage(uri, recipe.storage)
    return filesystem, path


def check_resources(recipe: Recipe, available: dict[str, float]) -> None:
    """Refuse a run the cluster cannot hold: a ``TorchTrainer`` that cannot get its workers waits forever.

    Raises:
        FinetuneError: names what is missing and the recipe keys to change.
    """
    ft = recipe.finetune
    assert ft is not None
    need_cpu = ft.workers * ft.cpus_per_worker
    if need_cpu > available.get("CPU", 0):
        raise FinetuneError(f"finetune: {ft.workers} workers × {ft.cpus_per_worker} CPUs = {need_cpu:g} CPUs, but "
                            f"the Ray cluster has {available.get('CPU', 0):g}; lower finetune.workers or "
                            "finetune.cpus_per_worker, or add nodes")
    if ft.use_gpu:
        need_gpu = ft.workers * ft.gpus_per_worker
        if need_gpu > available.get("GPU", 0):
            raise FinetuneError(f"finetune: {ft.workers} workers × {ft.gpus_per_worker} GPUs = {need_gpu:g} GPUs, "
                                f"but the Ray cluster has {available.get('GPU', 0):g}; lower finetune.workers, "
                                "set finetune.use_gpu=false, or add GPU nodes")


def build_trainer(recipe: Recipe, loop_config: dict[str, Any], name: str, storage_root: str) -> Any:
    """The ``TorchTrainer`` of one run (nothing starts until ``fit()``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cap_dist.finetune.loop import train_loop_per_worker
    from cap_dist.storage import worker_env

    ft = recipe.finetune
    assert ft is not None
    resources: dict[str, float] = {"CPU": ft.cpus_per_worker}
    if ft.use_gpu:
        resources["GPU"] = ft.gpus_per_worker
    filesystem, storage_path = _storage_filesystem(recipe, storage_root)
    run_options: dict[str, Any] = {}
    env = worker_env(recipe.storage)                # workers do not inherit the driver's S3 endpoint
    if env:
        run_options["worker_runtime_env"] = {"env_vars": env}
    run_config = RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                           failure_config=FailureConfig(max_failures=ft.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints), **run_options)
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                        scaling_config=ScalingConfig(num_workers=ft.workers, use_gpu=ft.use_gpu,
                                                     resources_per_worker=resources),
                        torch_config=TorchConfig(backend="nccl" if ft.use_gpu else "gloo"),
                        run_config=run_config)


def finetune(recipe: Recipe, student_uri: str, output_uri: str, step_index: int = 0,
             sparsity: float | None = None, *, inject_failure: dict[str, Any] | None = None,
             load: str = "sharded") -> dict[str, Any]:
    """Finetune the pruning output at ``student_uri`` as ``recipe.finetune`` says; write the result to
    ``output_uri`` (same format as a pruning output, plus ``metrics.parquet`` and ``curves.png``).

    Args:
        recipe: the recipe; its ``model`` section names the dense teacher, ``evaluation`` the images scored
            every epoch, ``finetune`` the run.
        student_uri: a finished pruning output (its manifest is read and its weights' checksum verified).
        output_uri: where the finetuned model goes.
        step_index: the pruning step this run recovers (part of the run name; gradual runs count 0, 1, ...).
        sparsity: the step's target sparsity, recorded in the output's manifest.
        inject_failure: tests only: ``{"step": k, "rank": r, "marker": path}`` kills worker ``r`` once after
            optimizer step ``k``.
        load: how workers get their shards of student and teacher: ``"sharded"`` (each reads only its rows,
            ranged reads) or ``"rank0"`` (rank 0 reads everything and broadcasts; kept to compare memory).

    Returns:
        rank 0's summary: ``output``, ``sparsity``, ``run_name``, ``steps``, ``epochs``, ``attempts``,
        ``resumed_from_step``, ``metrics`` (the last epoch's row).

    Raises:
        FinetuneError: no finetune section, the cluster is too small, or the run failed after its restarts.
    """
    from cap_dist import storage
    from cap_dist.engines.distributed.local_ray import connect
    from cap_dist.interruptible import call_in_thread
    from cap_dist.output import read_manifest

    if recipe.finetune is None:
        raise FinetuneError("the recipe has no finetune section; add one (see cap_dist/config.py: FinetuneConfig)")
    if load not in ("sharded", "rank0"):
        raise FinetuneError(f"load={load!r}: use 'sharded' (each worker reads its rows) or 'rank0' (broadcast)")
    ft = recipe.finetune
    student_uri, output_uri = _absolute(student_uri), _absolute(output_uri)
    storage.configure(recipe.storage)            # the recipe's S3 endpoint for the reads and writes below
    manifest = read_manifest(student_uri)
    connect(recipe)                              # before Ray is imported: a local Ray of ours stays on 127.0.0.1
    import ray

    from cap_dist.engines.distributed.resources import autoscaler

    scaler = autoscaler()
    if scaler is None:                   # a fixed cluster: what it lacks now it will always lack
        check_resources(recipe, ray.cluster_resources())
    else:                                # a head with zero workers is the normal start on a cloud
        log.info("finetune: %s adds the nodes Ray Train asks for (%d workers)", scaler, ft.workers)
    name = run_name(recipe, manifest, step_index)
    storage_root = _storage_root(recipe)
    loop_config = {"recipe": recipe.model_dump(mode="json"), "student": student_uri, "output": output_uri,
                   "step_index": step_index, "sparsity": sparsity, "run_name": name,
                   "storage_path": storage_root, "cwd": os.getcwd(), "inject_failure": inject_failure,
                   "load": load}
    log.info("finetune run %s: %d workers, %d epochs, checkpoints in %s/%s", name, ft.workers, ft.epochs,
             storage_root, name)
    trainer = build_trainer(recipe, loop_config, name, storage_root)
    try:
        # In a helper thread: from the main thread fit() takes SIGINT for good, and Ctrl-C would end the run
        # silently (see cap_dist/interruptible.py).
        result = call_in_thread(f"cap-dist finetune {name}", trainer.fit)
    except Exception as err:  # TrainingFailedError (V2), or a controller error
        raise FinetuneError(f"finetune run {name} failed (after up to finetune.max_failures={ft.max_failures} "
                            f"restarts; checkpoints in {storage_root}/{name}): {type(err).__name__}: {err}") from err
    if getattr(result, "error", None) is not None:         # the V1 path reports failures here
        raise FinetuneError(f"finetune run {name} failed: {result.error}")
    summary = getattr(result, "return_value", None)
    if not isinstance(summary, dict):                    # V1 has no return value: rebuild it from the output
        written = read_manifest(output_uri)
        summary = {**written.get("finetune", {}), "output": output_uri, "sparsity": written["sparsity"],
                   "run_name": name, "metrics": dict(result.metrics or {})}
    summary["checkpoint"] = getattr(getattr(result, "checkpoint", None), "path", None)
    return summary
