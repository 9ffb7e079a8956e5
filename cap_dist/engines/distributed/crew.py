"""The run's PruneActors, one per planned shard, each in its own bundle of the run's placement group; when some
die (a lost node: spot preemption is the normal failure), only those are replaced.

A replacement starts in the bundle of the actor it replaces (Ray re-places a lost node's bundles as soon as the
cluster has room again: a node the provider replaces, or one an autoscaler adds). The survivors keep what they
hold — loaded weights, Hessians, solved layers — and the driver streams again only what the replacement needs
(:mod:`cap_dist.engines.distributed.driver`). Waiting for room is bounded (``distributed.schedule_timeout_s``)
and logged from its first second: what the actor needs, what the cluster has free, what is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError

from cap_dist.engines.distributed.plan import ActorPlan
from cap_dist.engines.distributed.resources import bundle_text, shortfall

log = logging.getLogger(__name__)

# What a lost actor looks like to the driver: its calls fail, or an object it held (its node's store) is gone.
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError, ObjectLostError)
LOG_EVERY_S = 30.0
LOADING = "their slots are placed; the actors are loading their shards"
FIRST_LOG_S = 5.0          # a wait that lasts longer than this is said at once


class ResourcesUnavailableError(RuntimeError):
    """The cluster did not place the run's actors within ``distributed.schedule_timeout_s``."""


class ActorsLost(RuntimeError):
    """Some actor of the crew died while calls were in flight; ``pending`` are the calls not yet settled."""

    def __init__(self, cause: BaseException, pending: list[Any]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.pending = pending


def settled(refs: list[Any]) -> None:
    """Wait for every call in ``refs`` to finish or fail (their results are not needed)."""
    if refs:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)


@dataclass
class Recovery:
    """One recovery, for the manifest: the phase, the actors lost and how long until their replacements were up."""

    phase: str
    lost: list[int]
    seconds: float = 0.0


@dataclass
class Crew:
    """Start, watch and replace the run's actors.

    Attributes:
        actors: the live actor of each plan index.
        starts: how many actors were started in all (the plan's count, plus one per replacement).
        losses: how many times actors were lost (a replacement lost while loading counts again).
        recoveries: every recovery that got its replacements up.
    """

    recipe: Any
    source: Any
    plans: list[ActorPlan]
    run_id: str
    pg: Any
    actors: list[Any] = field(default_factory=list)
    generation: list[int] = field(default_factory=list)
    starts: int = 0
    losses: int = 0
    recoveries: list[Recovery] = field(default_factory=list)

    def start_all(self) -> None:
        self.generation = [0] * len(self.plans)
        self.actors = [self._start(p) for p in self.plans]
        self.wait_ready(list(range(len(self.plans))), "start")

    def name(self, index: int) -> str:
        """cap-dist-<recipe hash>-<run>-<generation>-<index>: unique per run (a rerun of the same recipe must not
        collide with actors still being torn down) and per replacement."""
        return f"cap-dist-{self.recipe.hash[:10]}-{self.run_id}-{self.generation[index]}-{index}"

    def _start(self, plan: ActorPlan) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cap_dist.engines.distributed.actor import PruneActor
        from cap_dist.storage import worker_env

        cfg = self.recipe.distributed
        options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": 0}
        env = worker_env(self.recipe.storage)      # actors do not inherit the driver's environment
        if env:
            options["runtime_env"] = {"env_vars": env}
        if cfg.memory_gb:
            options["memory"] = int(cfg.memory_gb * 2**30)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=plan.index)
        self.starts += 1
        return ray.remote(PruneActor).options(name=self.name(plan.index), scheduling_strategy=strategy,
                                              **options).remote(self.recipe.model_dump(mode="json"), self.source,
                                                                list(plan.stages), plan.index)

    def lost(self, patience_s: float = 10.0) -> list[int]:
        """Indices of the actors that are gone (their names no longer registered), waiting up to ``patience_s``
        for the cluster to notice the death the driver has seen."""
        deadline = time.monotonic() + patience_s
        while True:
            live = set(ray.util.list_named_actors())
            gone = [i for i in range(len(self.actors)) if self.name(i) not in live]
            if gone or time.monotonic() >= deadline:
                return gone
            time.sleep(0.2)

    def replace(self, err: ActorsLost, phase: str) -> list[int]:
        """Replace the actors that died; the survivors first finish (or fail) the calls they had queued. Returns
        the indices replaced.

        Raises:
            the original failure: no actor is gone (the failure was not a lost actor).
            ResourcesUnavailableError: a replacement found no room within ``distributed.schedule_timeout_s``.
        """
        start = time.monotonic()
        self.losses += 1
        gone = self.lost()
        if not gone:
            raise err.cause
        log.warning("lost actor(s) %s while %s (%s); replacing only those, the others keep their work",
                    gone, phase, type(err.cause).__name__)
        for i in gone:
            self.generation[i] += 1
            self.actors[i] = self._start(self.plans[i])   # loads its shard while the survivors settle
        settled(err.pending)
        self.wait_ready(gone, f"replacing actor(s) {gone}")
        self.recoveries.append(Recovery(phase, gone, time.monotonic() - start))
        return gone

    def wait_ready(self, indices: list[int], why: str) -> None:
        """Until the actors ``indices`` have been placed and have loaded their shards; placement waits at most
        ``distributed.schedule_timeout_s``, saying at once (and every 30 s) what is missing. (Loading a large
        shard from an object store may take minutes: it is logged, not timed out; an actor that fails to load
        raises its error here.)"""
        cfg = self.recipe.distributed
        pending = {self.actors[i].ready.remote(): i for i in indices}
        bundle = self.pg.bundle_specs[indices[0]]
        start = time.monotonic()
        waiting = list(pending)
        first = True
        while True:
            left = cfg.schedule_timeout_s - (time.monotonic() - start)
            step = FIRST_LOG_S if first else LOG_EVERY_S
            first = False
            done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(step, left) if left > 0 else step)
            try:
                ray.get(done)                               # an actor that died while loading: its error
            except ACTOR_FAILURES as err:
                raise ActorsLost(err, waiting) from err
            if not waiting:
                return
            slots = [pending[r] for r in waiting]
            missing = self._missing(bundle, slots)
            waited = time.monotonic() - start
            loading = missing.startswith(LOADING)
            if waited >= cfg.schedule_timeout_s and not loading:   # (the timeout bounds placement, not loading)
                raise ResourcesUnavailableError(
                    f"{why}: the cluster did not place actor(s) {slots} of {{{bundle_text(bundle)}}} each in "
                    f"{waited:.0f} s (distributed.schedule_timeout_s): {missing}. Add or replace nodes (layers "
                    "written so far are kept: the same command resumes), or lower distributed.actors or the per-actor "
                    "resources")
            log.log(logging.INFO if loading else logging.WARNING, "%s: waiting %.0f s so far for actor(s) %s of "
                    "{%s}: %s (gives up after %.0f s)", why, waited, slots, bundle_text(bundle), missing,
                    cfg.schedule_timeout_s)

    def _missing(self, bundle: dict[str, float], slots: list[int]) -> str:
        """Why actors ``slots`` are not up yet: their bundles wait for room (what is missing), or they load."""
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.pg)
        placed = table.get("bundles_to_node_id", {})
        unplaced = [i for i in slots if not placed.get(i)]
        if not unplaced and table.get("state") == "CREATED":
            return LOADING
        free = ray.available_resources()
        return (f"placement group {table.get('state', '?').lower()}, slot(s) {unplaced or slots} without a node; "
                + ("; ".join(shortfall(bundle, len(unplaced or slots), free, "the cluster now"))
                   or "enough free in total, but not on one node per actor"))

    def kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor already gone (its node lost) needs no kill
                pass

