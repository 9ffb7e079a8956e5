"""Can the cluster hold the run's actors, now or once its autoscaler has added nodes? Said before anything waits.

A fixed cluster whose nodes together (or any single node, for one actor) cannot hold the actors never will: that is
refused at once, naming what is missing. A cluster that could but is busy, or one with an autoscaler that adds
nodes on demand (a head with zero workers is the normal start on a cloud), is only logged: the driver's wait for
its placement group (``distributed.schedule_timeout_s``, logging every 30 s) is then what bounds it.
"""

from __future__ import annotations

import json
import logging
import ray

log = logging.getLogger(__name__)

KEYS = ("CPU", "GPU", "memory")


def actor_bundle(num_cpus: float, num_gpus: float, memory_gb: float | None) -> dict[str, float]:
    """What one actor asks for, every resource of it: a placement-group bundle must carry each one, or Ray
    refuses to place the actor in it."""
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    if memory_gb:
        bundle["memory"] = float(int(memory_gb * 2**30))
    return bundle


def amount(key: str, value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if key == "memory" else f"{value:g}"


def shortfall(bundle: dict[str, float], count: int, have: dict[str, float], where: str = "") -> list[str]:
    """``count`` bundles against the resources ``have`` (``where``: whose they are): one phrase per resource
    that falls short, e.g. "2 actors × 3 CPU = 6 CPU, but the Ray cluster has 4"."""
    return [f"{count} actors × {amount(key, need)} {key} = {amount(key, count * need)} {key}, but {where} has "
            f"{amount(key, have.get(key, 0.0))}"
            for key, need in bundle.items() if count * need > have.get(key, 0.0) + 1e-9]


def autoscaler() -> str | None:
    """A description of the cluster's autoscaler, or None when nothing will add nodes. Ray's autoscaler (``ray up``
    clusters, KubeRay with ``enableInTreeAutoscaling``, the fake multi-node provider of tests) publishes its status
    in the GCS key-value store each round, naming the node type of every node; a Ray started without an
    autoscaling config runs a read-only one, whose "types" are the node ids themselves. A cluster config
    (autoscaler v2) lists its node groups."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get("__autoscaling_status")
    report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
    types = set((report.get("node_type_mapping") or {}).values())
    if any(not t.startswith("node_") for t in types):
        active = sum((report.get("active_nodes") or {}).values())
        pending = len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())
        return f"the cluster's autoscaler ({active} nodes active, {pending} starting)"
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return f"the cluster's autoscaler ({len(config.node_group_configs)} node groups)"
    return None


def check_resources(bundle: dict[str, float], count: int, timeout_s: float) -> None:
    """Refuse ``count`` actors of ``bundle`` that the cluster can never hold; log, before the bounded wait, what is
    missing when it cannot hold them now.

    Raises:
        ValueError: no autoscaler, and the cluster's nodes cannot hold the actors even when idle.
    """
    free = ray.available_resources()
    missing_now = shortfall(bundle, count, free, "the cluster now")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    too_big = not any(not shortfall(bundle, 1, n) for n in nodes)
    if not missing_now and not too_big:
        return
    scaler = autoscaler()
    if scaler is not None:
        log.warning("the cluster cannot place %d actors of {%s} yet (%s); %s is expected to add nodes; waiting up "
                    "to %.0f s (distributed.schedule_timeout_s)", count, bundle_text(bundle), "; ".join(missing_now) or
                    "no node holds one actor", scaler, timeout_s)
        return
    total = ray.cluster_resources()
    short = [key for key, need in bundle.items() if count * need > total.get(key, 0.0) + 1e-9]
    if short:
        hint = {"CPU": "lower distributed.actors or distributed.num_cpus",
                "GPU": "lower distributed.num_gpus or add GPU nodes",
                "memory": "lower distributed.memory_gb or distributed.actors"}[short[0]]
        raise ValueError(f"distributed: {'; '.join(shortfall(bundle, count, total, 'the Ray cluster'))} (a fixed "
                         f"cluster: no autoscaler); {hint}")
    if too_big:
        raise ValueError(f"distributed: no node of the Ray cluster (no autoscaler) holds one actor of "
                         f"{{{bundle_text(bundle)}}}; the largest nodes have {bundle_text(_largest(nodes))}; lower "
                         "distributed.num_cpus / num_gpus / memory_gb")
    log.warning("the cluster is busy: %s for %d actors of {%s}; waiting up to %.0f s (distributed.schedule_timeout_s) "
                "for other work to free them", "; ".join(missing_now), count, bundle_text(bundle), timeout_s)


def _largest(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in KEYS}


def bundle_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {amount(k, v)}" for k, v in resources.items())
