"""The Ray driver: plan, start actors, stream calibration through them, allocate, solve, write the shards.

    cap-dist prune --config jobs/vit4mnist.yaml distributed.actors=2        # local Ray on a laptop
    ray job submit -- python -m cap_dist prune --config jobs/X.yaml          # joins the cluster

Calibration batches are put in the object store once; each actor's output goes to the next actor by
reference, and since an actor runs its calls in order, actor 0 works on batch b+1 while actor 1 works on
batch b (a pipeline).  Independent mode then solves every layer of every actor in parallel; sequential
mode runs the actors one after another, each on the pruned outputs of the one before.

If actors die (a lost node, out of memory), only those are replaced (:mod:`~cap_dist.engines.distributed.crew`);
the survivors keep their weights, Hessians and solved layers. Each phase below is written to be run again after
a replacement and to redo only what the replacement lacks: calibration batches are streamed again only as far
as an actor that still needs them, through survivors that pass them on without counting them twice (and with
their dense weights swapped back in, if they have solved layers already); layers already written are read back,
not solved again; BatchNorm statistics are measured once per batch per actor. ``distributed.max_attempts``
bounds the recoveries of one run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

from cap_dist.config import Recipe
from cap_dist.core import (LayerRecord, PruneResult, check_layers_fit, curve_depth, estimated_solve_flops,
                           layer_levels, layer_table, model_stages, needs_loss_curves, select_layers)
from cap_dist.engines.distributed.crew import (ACTOR_FAILURES, FIRST_LOG_S, LOG_EVERY_S, ActorsLost, Crew,
                                               ResourcesUnavailableError)
from cap_dist.engines.distributed.local_ray import connect
from cap_dist.engines.distributed.plan import (StageCost, pipeline_note, pipeline_steps, plan_actors, plan_json,
                                               plan_table, shard_owners)
from cap_dist.engines.distributed.resources import actor_bundle, bundle_text, check_resources, shortfall
from cap_dist.models.capture import layer_columns
from cap_dist.models.source import ModelSource
from cap_dist.shards import WrittenFile, shard_name
from cap_dist.storage import atomic_write_bytes

log = logging.getLogger(__name__)


class CalibrationRefs:
    """The calibration images in Ray's object store, each form put once, when a phase first needs it: the whole
    batches, which every phase sees exactly as the local engine does, and, with ``distributed.pipeline_images``,
    the dense stream's smaller steps (Hessians are sums over images, so how the stream is cut changes only their
    rounding: float32 products over other chunks of rows)."""

    def __init__(self, batches: list[torch.Tensor], step_images: int | None) -> None:
        self.batches = batches
        self.step_images = step_images
        self._steps: list[Any] | None = None
        self._whole: list[Any] | None = None

    def whole(self) -> list[Any]:
        if self._whole is None:
            self._whole = [ray.put(x) for x in self.batches]
        return self._whole

    def steps(self) -> list[Any]:
        if self.step_images is None or all(len(x) <= self.step_images for x in self.batches):
            return self.whole()                                      # the same cut: nothing to put twice
        if self._steps is None:
            self._steps = [ray.put(x) for x in pipeline_steps(self.batches, self.step_images)]
        return self._steps


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


def _check_resources(recipe: Recipe, n_actors: int) -> None:
    """Against what the cluster has free now, and what it could have (its nodes, its autoscaler): refuse at once
    what can never fit, say what is missing before any wait (:func:`resources.check_resources`)."""
    cfg = recipe.distributed
    check_resources(_bundle(recipe), n_actors, cfg.schedule_timeout_s)


def _bundle(recipe: Recipe) -> dict[str, float]:
    cfg = recipe.distributed
    return actor_bundle(cfg.num_cpus, cfg.num_gpus, cfg.memory_gb)


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
    step = FIRST_LOG_S                    # a wait longer than a few seconds is said at once, then every 30 s
    while True:
        left = cfg.schedule_timeout_s - (time.monotonic() - start)
        done, _ = ray.wait([ready], timeout=max(0.0, min(step, left)))
        if done:
            return pg
        step = LOG_EVERY_S
        waited = time.monotonic() - start
        missing = "; ".join(shortfall(bundle, n_actors, ray.available_resources(), "the cluster now")) or \
            "enough free in total, but not on the nodes the placement strategy allows"
        if waited >= cfg.schedule_timeout_s:
            remove_placement_group(pg)
            raise ResourcesUnavailableError(
                f"the cluster did not place {n_actors} actors of {{{bundle_text(bundle)}}} each "
                f"({cfg.placement or 'PACK'}) in {waited:.0f} s (distributed.schedule_timeout_s): {missing}. Add "
                "nodes, lower distributed.actors or the per-actor resources, or wait longer")
        log.warning("waiting %.0f s so far for %d actor slots of {%s}: %s (gives up after %.0f s)",
                    waited, n_actors, bundle_text(bundle), missing, cfg.schedule_timeout_s)


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


def stream_route(needs: list[list[int]], n_batches: int) -> dict[int, int]:
    """For each batch some actor still needs: the last actor it must reach (the chain stops there)."""
    last: dict[int, int] = {}
    for i, batches in enumerate(needs):
        for b in batches:
            last[b] = i
    return {b: last[b] for b in range(n_batches) if b in last}


def _stream(actors: list[Any], batch_refs: list[Any], route: dict[int, int], call: str, desc: str,
            unit: str = "batch") -> None:
    """Push batch b through actors 0..route[b] (pipelined: an actor runs its calls in order, so actor 0 works on
    batch b+1 while actor 1 works on batch b) and wait for all of them."""
    finals = []
    for b, last in route.items():
        ref = batch_refs[b]
        for actor in actors[:last + 1]:
            ref = getattr(actor, call).remote(ref, b)
        finals.append(ref)
    _wait_all(finals, desc, unit)


def _wait_all(refs: list[Any], desc: str | None = None, unit: str = "call") -> list[Any]:
    """Every result of ``refs``, with a progress bar where ``desc`` names one; a lost actor raises
    :class:`ActorsLost` with the calls still in flight (the bar is closed however the wait ends, so an
    interrupt's one line comes last)."""
    results: dict[Any, Any] = {}
    with tqdm(total=len(refs), desc=desc, unit=unit, disable=desc is None) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[done[0]] = ray.get(done[0])
            except ACTOR_FAILURES as err:
                raise ActorsLost(err, pending) from err
            bar.update(1)
    return [results[r] for r in refs]


def _calibrate(actors: list[Any], batch_refs: list[Any]) -> None:
    """Dense calibration of the actors that still need batches (all of them at first; after a lost actor, its
    replacement). The survivors ahead of it pass the batches on without folding them again, with the dense
    weights of any layer solved or read back swapped in for the stream."""
    n = len(batch_refs)
    route = stream_route(_wait_all([a.needs.remote(n) for a in actors]), n)
    if not route:
        return
    # (the last actor too: a replacement has read back the layers its predecessor wrote, and the layers after
    # them in its own blocks must see the dense ones, as in the first pass)
    chain = actors[:max(route.values()) + 1]
    _wait_all([a.dense_view.remote(True) for a in chain])
    _stream(actors, batch_refs, route, "forward", "calibration steps", "step")
    _wait_all([a.dense_view.remote(False) for a in chain])


def _solve_independent(actors: list[Any], levels: dict[str, float]) -> None:
    """Every layer of every actor in parallel, except those an actor has already (solved, or read back)."""
    names = _wait_all([a.layer_names.remote() for a in actors])
    done = _wait_all([a.get_records.remote() for a in actors])
    calls = [actor.solve_layer.remote(name, levels[name]) for actor, own, recs in zip(actors, names, done)
             for name in own if name not in {r["layer"] for r in recs}]
    _wait_all(calls, "layers solved", "layer")
    _wait_all([a.finish_writes.remote() for a in actors])          # the last layer files, written in the background


def _solve_sequential(actors: list[Any], batch_refs: list[Any], levels: dict[str, float],
                      outputs: dict[int, Any]) -> None:
    """Each actor on the pruned outputs of the one before, skipping actors already done (``outputs``: each done
    actor's outputs; a lost actor's are dropped, its replacement reads its layers back and makes them again)."""
    with tqdm(total=len(actors), initial=len(outputs), desc="actors solved (sequential)", unit="actor") as bar:
        for i, actor in enumerate(actors):
            if i in outputs:
                continue
            ref = actor.sequential.remote(batch_refs if i == 0 else outputs[i - 1], levels)
            try:
                ray.get(ref)
            except ACTOR_FAILURES as err:
                raise ActorsLost(err, []) from err
            outputs[i] = ref
            bar.update(1)


def _reestimate_batchnorm(actors: list[Any], batch_refs: list[Any]) -> None:
    """The local engine's BatchNorm pass, sharded: every calibration batch streams through the pruned actor chain
    while each actor's BatchNorm layers measure. An actor runs its calls in the order they were submitted, so
    each sees the batches in the local pass's order and ends with the same statistics; after a lost actor, a
    batch goes only as far as an actor that has not measured it, and an actor that has passes it on unchanged."""
    n = len(batch_refs)
    _wait_all([a.batchnorm_begin.remote() for a in actors])
    route = stream_route(_wait_all([a.batchnorm_needs.remote(n) for a in actors]), n)
    _stream(actors, batch_refs, route, "batchnorm_forward", "BatchNorm batches")
    _wait_all([a.batchnorm_end.remote() for a in actors])


def _run_phases(recipe: Recipe, crew: Crew, refs: CalibrationRefs, run: dict[str, Any]) -> None:
    """Calibrate, allocate, solve, re-estimate BatchNorm: each phase redoes only what is missing, so after a
    replacement the same call carries on (``run`` keeps the levels, the sequential outputs, the timings and
    which phase is running)."""
    cfg = recipe.prune
    actors = crew.actors
    timings = run["timings"]
    start = time.perf_counter()
    if cfg.mode == "independent" or (cfg.allocation == "global" and run["levels"] is None):
        run["phase"] = "calibrating"
        _calibrate(actors, refs.steps())
    timings["calibrate"] = timings.get("calibrate", 0.0) + time.perf_counter() - start
    if run["levels"] is None:
        run["phase"] = "allocating"
        start = time.perf_counter()
        try:
            run["levels"] = _levels(recipe, actors)
        except ACTOR_FAILURES as err:
            raise ActorsLost(err, []) from err
        timings["allocate"] = time.perf_counter() - start
    run["phase"] = "solving"
    start = time.perf_counter()
    if cfg.mode == "independent":
        _solve_independent(actors, run["levels"])
    else:
        _solve_sequential(actors, refs.whole(), run["levels"], run["outputs"])
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - start
    if cfg.batchnorm == "reestimate":
        run["phase"] = "re-estimating BatchNorm"
        if sum(_wait_all([a.batchnorm_layers.remote() for a in actors])):
            start = time.perf_counter()
            _reestimate_batchnorm(actors, refs.whole())
            timings["batchnorm"] = timings.get("batchnorm", 0.0) + time.perf_counter() - start
    run["phase"] = "gathering"


def _recover(recipe: Recipe, crew: Crew, err: ActorsLost, run: dict[str, Any]) -> None:
    """Replace the lost actors and hand each replacement what the phases will not redo for it."""
    cfg = recipe.distributed
    if crew.losses + 1 >= cfg.max_attempts:
        raise RuntimeError(f"actors died {crew.losses + 1} times, the last while {run['phase']} "
                           f"(distributed.max_attempts={cfg.max_attempts}): {err}") from None
    replaced = crew.replace(err, run["phase"])
    for i in replaced:
        run["outputs"].pop(i, None)              # sequential: its outputs were in its node's object store
    if run["levels"] is not None and recipe.prune.mode == "independent":
        # Layers the lost actors wrote are read back; Hessians are collected only for the others.
        _wait_all([crew.actors[i].prepare.remote(run["levels"]) for i in replaced])


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
    _check_resources(recipe, len(plans))
    atomic_write_bytes(f"{recipe.output.rstrip('/')}/plan.json", plan_json(plans).encode())
    refs = CalibrationRefs([x for x, _ in calibration], recipe.distributed.pipeline_images)
    if recipe.prune.mode == "independent" or recipe.prune.allocation == "global":
        print(pipeline_note([len(x) for x, _ in calibration], recipe.distributed.pipeline_images, len(plans)))
    del calibration
    run_id = uuid.uuid4().hex[:8]
    pg = reserve(recipe, len(plans), run_id)
    crew = Crew(recipe, source, plans, run_id, pg)
    run: dict[str, Any] = {"levels": None, "outputs": {}, "timings": {}, "phase": "starting"}
    try:
        crew.start_all()
        lost: ActorsLost | None = None
        while True:
            try:
                if lost is not None:
                    _recover(recipe, crew, lost, run)      # (a replacement lost while loading: recovered again)
                    lost = None
                actors = crew.actors
                _run_phases(recipe, crew, refs, run)
                result = {"levels": run["levels"], "timings": run["timings"]}
                # Gathering is part of the run: an actor lost now is replaced like one lost while solving.
                records = [LayerRecord(**r) for part in ray.get([a.get_records.remote() for a in actors])
                           for r in part]
                ray.get([a.release.remote() for a in actors])
                write_start = time.perf_counter()
                shards = _write_shards(recipe, actors)
                stats = ray.get([a.stats.remote() for a in actors])       # after writing: its memory counts
                break
            except ActorsLost as err:
                lost = err
            except ACTOR_FAILURES as err:
                lost = ActorsLost(err, [])
    finally:
        # However the run ends (done, failed, Ctrl-C, SIGTERM): no actor and no reservation outlives it; the
        # layer files written so far stay, so a rerun resumes.
        crew.kill()
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    for s in stats:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in s["stage_peak_rss_mb"].items())
        log.info("actor %d: peak RSS %.0f MiB (runtime %.0f; by stage: %s), load %.1fs, calibrate %.1fs, "
                 "solve %.1fs", s["index"], s["peak_rss_mb"], s["baseline_rss_mb"], stages, s["load_seconds"],
                 s["calibrate_seconds"], s["solve_seconds"])
    timings = dict(result["timings"], load=max(s["load_seconds"] for s in stats))
    manifest = write_output(recipe, None, [r.row() for r in records], input_spec, timings,
                            extra={"engine": "ray", "actors": stats, "plan": [list(p.stages) for p in plans],
                                   "actor_starts": crew.starts,
                                   "recoveries": [dataclasses.asdict(r) for r in crew.recoveries]},
                            source=source, shards=shards)
    timings.update(write=time.perf_counter() - write_start, total=time.perf_counter() - total_start)
    manifest["timings"] = timings
    print(layer_table(records))
    return PruneResult(recipe=recipe, engine="ray", layers=records, timings=timings, input_spec=input_spec,
                       manifest=manifest)
