"""The Ray driver: plan, start actors, stream calibration through them, allocate, solve, write the shards.

    cap-dist prune --config jobs/vit4mnist.yaml distributed.actors=2        # local Ray on a laptop
    ray job submit -- python -m cap_dist prune --config jobs/X.yaml          # joins the cluster

Calibration batches are put in the object store once; each actor's output goes to the next actor by
reference, and since an actor runs its calls in order, actor 0 works on batch b+1 while actor 1 works on
batch b (a pipeline).  Independent mode then solves every layer of every actor in parallel; sequential
mode runs the actors one after another, each on the pruned outputs of the one before.

If an actor dies (killed, out of memory), the attempt is abandoned, fresh actors are started, and the run
resumes: layers already written are read back, not solved again.  A layer that fails ``max_attempts``
times fails the job, naming the layer.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from tqdm.auto import tqdm

from cap_dist.config import Recipe
from cap_dist.core import (LayerRecord, PruneResult, check_layers_fit, curve_depth, estimated_solve_flops,
                           layer_levels, layer_table, model_stages, needs_loss_curves, select_layers)
from cap_dist.engines.distributed.actor import PruneActor
from cap_dist.engines.distributed.local_ray import connect
from cap_dist.engines.distributed.plan import (ActorPlan, StageCost, plan_actors, plan_json, plan_table,
                                               shard_owners)
from cap_dist.models.capture import layer_columns
from cap_dist.models.source import ModelSource
from cap_dist.shards import WrittenFile, shard_name
from cap_dist.storage import atomic_write_bytes

log = logging.getLogger(__name__)

ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)


def stage_costs(recipe: Recipe, skeleton: torch.nn.Module) -> tuple[list[StageCost], int]:
    """Costs of prefix, blocks and suffix from the model's meta-device skeleton (no weights read); also refuses,
    before anything is calibrated, a pattern or quantization group that some layer does not fit."""
    from cap_dist.models.families import split_blocks

    layers = select_layers(skeleton, recipe.model)
    check_layers_fit(recipe.prune, layers)
    stages = model_stages(skeleton, layers, None)
    parts = split_blocks(skeleton)
    costs = []
    for stage in stages:
        if stage.name in ("prefix", "suffix"):
            members = [m for i in range(len(parts.blocks)) for m in parts.members(i)]
            params = [p for n, p in skeleton.named_parameters() if not any(n.startswith(m + ".") for m in members)]
            weight_bytes = sum(p.numel() * 4 for p in params) // 2
        else:
            i = parts.names.index(stage.name)
            weight_bytes = sum(p.numel() * 4 for m in parts.members(i)
                               for p in skeleton.get_submodule(m).parameters())
        hess = sum(layer_columns(m) ** 2 * 8 for m in stage.layers.values())
        flops = sum(estimated_solve_flops(m, recipe.prune) for m in stage.layers.values())
        costs.append(StageCost(stage.name, weight_bytes, hess, float(flops)))
    return costs, len(parts.blocks)


def _check_resources(recipe: Recipe) -> None:
    cfg = recipe.distributed
    have = ray.cluster_resources()
    need_cpu, need_gpu = cfg.actors * cfg.num_cpus, cfg.actors * cfg.num_gpus
    if need_cpu > have.get("CPU", 0):
        raise ValueError(f"distributed: {cfg.actors} actors × {cfg.num_cpus} CPUs = {need_cpu} CPUs, but the Ray "
                         f"cluster has {have.get('CPU', 0):g}; lower distributed.actors or distributed.num_cpus")
    if need_gpu > have.get("GPU", 0):
        raise ValueError(f"distributed: {cfg.actors} actors × {cfg.num_gpus} GPUs = {need_gpu} GPUs, but the Ray "
                         f"cluster has {have.get('GPU', 0):g}; lower distributed.num_gpus or add GPU nodes")
    if cfg.memory_gb and cfg.memory_gb * 2**30 > have.get("memory", 0):
        raise ValueError(f"distributed.memory_gb={cfg.memory_gb} per actor exceeds the cluster's memory")


class ResourcesUnavailableError(RuntimeError):
    """The cluster did not place the run's actors within ``distributed.schedule_timeout_s``."""


def _bundle(recipe: Recipe) -> dict[str, float]:
    """What one actor asks for, every resource of it: a placement-group bundle must carry each one, or Ray
    refuses to place the actor in it."""
    cfg = recipe.distributed
    bundle = {"CPU": float(cfg.num_cpus)}
    if cfg.num_gpus:
        bundle["GPU"] = float(cfg.num_gpus)
    if cfg.memory_gb:
        bundle["memory"] = float(int(cfg.memory_gb * 2**30))
    return bundle


def reserve(recipe: Recipe, n_actors: int, run_id: str) -> Any:
    """One placement group for the whole run (every attempt reuses it; the caller removes it however the run
    ends), with one bundle per actor (``distributed.placement``: PACK or SPREAD; PACK, best effort, when unset).
    Waits until the cluster places it, logging what is missing every 30 s, at most ``schedule_timeout_s``."""
    from ray.util.placement_group import placement_group, remove_placement_group

    cfg = recipe.distributed
    bundle = _bundle(recipe)
    pg = placement_group([dict(bundle) for _ in range(n_actors)], strategy=cfg.placement or "PACK",
                         name=f"cap-dist-{recipe.hash[:10]}-{run_id}")
    ready = pg.ready()
    start = time.monotonic()
    while True:
        left = cfg.schedule_timeout_s - (time.monotonic() - start)
        done, _ = ray.wait([ready], timeout=max(0.0, min(30.0, left)))
        if done:
            return pg
        waited = time.monotonic() - start
        wanted = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        have = {k: v for k, v in ray.available_resources().items() if k in bundle}
        if waited >= cfg.schedule_timeout_s:
            remove_placement_group(pg)
            raise ResourcesUnavailableError(
                f"the cluster did not place {n_actors} actors of {{{wanted}}} each ({cfg.placement or 'PACK'}) in "
                f"{waited:.0f} s (distributed.schedule_timeout_s); available now: {have or 'nothing of these'}. Add "
                "nodes, lower distributed.actors or the per-actor resources, or wait longer")
        log.warning("waiting %.0f s so far for %d actor slots of {%s}; available now: %s (gives up after %.0f s)",
                    waited, n_actors, wanted, have or "nothing of these", cfg.schedule_timeout_s)


def _start_actors(recipe: Recipe, source: ModelSource, plans: list[ActorPlan], attempt: int, run_id: str,
                  pg: Any) -> list[Any]:
    """Actors named cap-dist-<recipe hash>-<run>-<attempt>-<index> (unique per run: a rerun of the same recipe
    must not collide with the names of actors that are still being torn down), actor i in bundle i of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cap_dist.storage import worker_env

    cfg = recipe.distributed
    remote = ray.remote(PruneActor)
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": 0}
    env = worker_env(recipe.storage)      # actors do not inherit the driver's environment
    if env:
        options["runtime_env"] = {"env_vars": env}
    if cfg.memory_gb:
        options["memory"] = int(cfg.memory_gb * 2**30)
    recipe_dict = recipe.model_dump(mode="json")
    actors = []
    for p in plans:
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=p.index)
        opts = dict(options, name=f"cap-dist-{recipe.hash[:10]}-{run_id}-{attempt}-{p.index}",
                    scheduling_strategy=strategy)
        actors.append(remote.options(**opts).remote(recipe_dict, source, list(p.stages), p.index))
    return actors


def _kill(actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - an actor already gone (its node lost) needs no kill
            pass


def _levels(recipe: Recipe, actors: list[Any]) -> dict[str, float]:
    """Every layer's target: the recipe's level, or a global allocation over the loss curves the actors compute
    from the Hessians they hold."""
    cfg = recipe.prune
    names = [n for names in ray.get([a.layer_names.remote() for a in actors]) for n in names]
    curves: dict[str, Any] | None = None
    if needs_loss_curves(cfg):
        curves = {}
        for part in ray.get([a.loss_curves.remote(curve_depth(cfg)) for a in actors]):
            curves.update(part)
    return layer_levels(cfg, names, curves)


def _stream_dense(actors: list[Any], batch_refs: list[Any]) -> None:
    """Push every batch through the actor chain (pipelined) and wait for all of them."""
    finals = []
    for ref in batch_refs:
        for actor in actors:
            ref = actor.forward.remote(ref)
        finals.append(ref)
    with tqdm(total=len(finals), desc="calibration batches", unit="batch") as bar:
        pending = list(finals)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            bar.update(len(done))


def _attempt(recipe: Recipe, actors: list[Any], batch_refs: list[Any], failures: dict[str, int]) -> dict[str, Any]:
    cfg = recipe.prune
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.mode == "independent" or cfg.allocation == "global":
        _stream_dense(actors, batch_refs)
    timings["calibrate"] = time.perf_counter() - start
    start = time.perf_counter()
    levels = _levels(recipe, actors)
    timings["allocate"] = time.perf_counter() - start
    start = time.perf_counter()
    if cfg.mode == "independent":
        owner = {}
        calls = {}
        for actor, names in zip(actors, ray.get([a.layer_names.remote() for a in actors])):
            for name in names:
                ref = actor.solve_layer.remote(name, levels[name])
                calls[ref] = name
                owner[name] = actor
        # (bars as context managers: closed however the wait ends, so an interrupt's one line comes last)
        with tqdm(total=len(calls), desc="layers solved", unit="layer") as bar:
            pending = list(calls)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done[0])
                except ACTOR_FAILURES:
                    failures[calls[done[0]]] = failures.get(calls[done[0]], 0) + 1
                    raise
                bar.update(1)
    else:
        hidden: Any = batch_refs
        with tqdm(total=len(actors), desc="actors solved (sequential)", unit="actor") as bar:
            for actor in actors:
                hidden = actor.sequential.remote(hidden, levels)
                ray.wait([hidden], num_returns=1)
                ray.get(hidden)
                bar.update(1)
    timings["solve"] = time.perf_counter() - start
    if cfg.batchnorm == "reestimate" and sum(ray.get([a.batchnorm_layers.remote() for a in actors])):
        start = time.perf_counter()
        _reestimate_batchnorm(actors, batch_refs)
        timings["batchnorm"] = time.perf_counter() - start
    return {"levels": levels, "timings": timings}


def _reestimate_batchnorm(actors: list[Any], batch_refs: list[Any]) -> None:
    """The local engine's BatchNorm pass, sharded: every calibration batch streams through the pruned actor chain
    while each actor's BatchNorm layers measure. An actor runs its calls in the order they were submitted, so
    each sees the batches in the local pass's order and ends with the same statistics."""
    ray.get([a.batchnorm_begin.remote() for a in actors])
    finals = []
    for ref in batch_refs:
        for actor in actors:
            ref = actor.batchnorm_forward.remote(ref)
        finals.append(ref)
    ray.get(finals)
    ray.get([a.batchnorm_end.remote() for a in actors])


def _write_shards(recipe: Recipe, actors: list[Any]) -> list[WrittenFile]:
    """Every actor writes the tensors it owns (:func:`shard_owners`) straight into its own safetensors shard of
    the output, in parallel; the driver sees tensor names and file digests only, never a tensor."""
    held = ray.get([a.tensor_names.remote() for a in actors])
    owned = shard_owners(held, ray.get([a.batchnorm_measured.remote() for a in actors]))
    writers = [i for i, keys in enumerate(owned) if keys]
    refs = [actors[i].write_shard.remote(owned[i], shard_name(k + 1, len(writers))) for k, i in enumerate(writers)]
    return [WrittenFile(**dict(w, keys=tuple(w["keys"]))) for w in ray.get(refs)]


def prune_distributed(recipe: Recipe, source: ModelSource | None = None, write: bool = True) -> PruneResult:
    """Run a recipe on Ray; writes the local engine's output with the weights sharded, one safetensors shard per
    actor written by that actor, plus ``model.safetensors.index.json`` (and each actor's stats and the plan).

    ``source``: the recipe's model source, already parsed (by :func:`cap_dist.engines.prune`)."""
    from cap_dist.data.draw import draw_batches
    from cap_dist.output import write_output

    if not write:
        raise ValueError("the Ray engine writes its layers as it solves them: it always needs an output (write=True)")
    if recipe.prune.curvature == "fisher":
        raise ValueError("prune.curvature=fisher needs whole-model backward passes; run it with engine=local")
    if recipe.distributed.actors < 1:
        raise ValueError(f"distributed.actors={recipe.distributed.actors}: need at least 1 actor")
    total_start = time.perf_counter()
    source = source if source is not None else ModelSource.of(recipe.model)
    skeleton = source.meta_skeleton()
    costs, n_blocks = stage_costs(recipe, skeleton)  # a pattern/group no layer fits fails here, not after calibrating
    input_spec = source.input_spec(skeleton)
    del skeleton
    calibration = draw_batches(recipe.calibration, input_spec, purpose="calibration")
    plans = plan_actors(costs, recipe.distributed.actors, n_blocks)
    print(plan_table(plans))
    connect(recipe)
    _check_resources(recipe)
    atomic_write_bytes(f"{recipe.output.rstrip('/')}/plan.json", plan_json(plans).encode())
    batch_refs = [ray.put(x) for x, _ in calibration]
    failures: dict[str, int] = {}
    run_id = uuid.uuid4().hex[:8]
    pg = reserve(recipe, len(plans), run_id)
    actors: list[Any] = []
    try:
        for attempt in range(recipe.distributed.max_attempts):
            actors = _start_actors(recipe, source, plans, attempt, run_id, pg)
            try:
                result = _attempt(recipe, actors, batch_refs, failures)
                # Gathering is part of the attempt: an actor lost now is recovered like one lost while solving.
                records = [LayerRecord(**r) for part in ray.get([a.get_records.remote() for a in actors])
                           for r in part]
                ray.get([a.release.remote() for a in actors])
                write_start = time.perf_counter()
                shards = _write_shards(recipe, actors)
                stats = ray.get([a.stats.remote() for a in actors])       # after writing: its memory counts
                break
            except ACTOR_FAILURES as err:
                _kill(actors)
                worst = max(failures.items(), key=lambda kv: kv[1], default=(None, 0))
                if attempt + 1 >= recipe.distributed.max_attempts:
                    where = f" while solving layer {worst[0]!r}" if worst[0] else ""
                    raise RuntimeError(f"an actor died{where} in {attempt + 1} attempts "
                                       f"(distributed.max_attempts={recipe.distributed.max_attempts}): {err}") from None
                log.warning("an actor died (%s); attempt %d of %d resumes from the layers already written",
                            type(err).__name__, attempt + 2, recipe.distributed.max_attempts)
    finally:
        # However the run ends (done, failed, Ctrl-C, SIGTERM): no actor and no reservation outlives it; the
        # layer files written so far stay, so a rerun resumes.
        _kill(actors)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    for s in stats:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in s["stage_peak_rss_mb"].items())
        log.info("actor %d: peak RSS %.0f MiB (runtime %.0f; by stage: %s), load %.1fs, calibrate %.1fs, "
                 "solve %.1fs", s["index"], s["peak_rss_mb"], s["baseline_rss_mb"], stages, s["load_seconds"],
                 s["calibrate_seconds"], s["solve_seconds"])
    timings = dict(result["timings"], load=max(s["load_seconds"] for s in stats))
    manifest = write_output(recipe, None, [r.row() for r in records], input_spec, timings,
                            extra={"engine": "ray", "actors": stats, "plan": [list(p.stages) for p in plans]},
                            source=source, shards=shards)
    timings.update(write=time.perf_counter() - write_start, total=time.perf_counter() - total_start)
    manifest["timings"] = timings
    print(layer_table(records))
    return PruneResult(recipe=recipe, engine="ray", layers=records, timings=timings, input_spec=input_spec,
                       manifest=manifest)
