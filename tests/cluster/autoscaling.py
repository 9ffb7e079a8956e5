"""A prune submitted to an autoscaling cluster whose head has zero workers: the autoscaler adds a worker node of
cluster/aws.yaml's types, the prune runs on it, and the node is released after the idle timeout (run as a script,
in its own process: it starts its own Ray with Ray's fake multi-node autoscaler, which must not meet the test
run's shared cluster).

    python -m tests.cluster.autoscaling RESULT.json [SHARED_DIR]

The head is started the way ``ray.cluster_utils.AutoscalingCluster`` starts one (an autoscaling config whose
provider is ``fake_multinode``, ``RAY_FAKE_CLUSTER=1``), but as a ``ray.cluster_utils.Cluster`` head in this
process: AutoscalingCluster runs ``ray stop --force``, which would stop every Ray on the machine, and its base
config is not shipped in the ray wheel. Scaled down for a 2-core machine: each worker type keeps its GPU count,
with its CPUs divided by ``SCALE`` and at most one node per type; the idle timeout is 0.1 min (6 s, aws.yaml:
5 min). The fake provider cannot set a node's memory (Ray refuses ``memory`` as a custom resource), so each fake
node advertises this machine's. The result JSON holds the seconds from submit to the first worker node, to the
actors' start, to the finished output, and to the release of the last worker node.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.cluster.simulated import keep_cluster_address_private, worker_types
from tests.conftest import LOCAL_ONLY

ROOT = Path(__file__).resolve().parents[2]
SCALE = 8
IDLE_TIMEOUT_MINUTES = 0.1


def autoscaling_config(gcs_address: str) -> dict[str, Any]:
    """cluster/aws.yaml's worker types for the fake multi-node provider, scaled down (see the module doc)."""
    types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, shape in worker_types().items():
        types[name] = {"resources": {"CPU": max(1, int(shape["CPU"]) // SCALE), "GPU": int(shape["GPU"]),
                                     "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {"cluster_name": "cap-dist-fake", "max_workers": len(types) - 1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and not n["Resources"].get("node:__internal_head__")]


def _processes_under(folder: str) -> list[int]:
    """Ids of the processes whose command line names ``folder`` (this run's Ray session: the fake worker nodes the
    autoscaler started, which the head's shutdown does not stop)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if folder in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


def main(result_path: Path, shared: Path) -> None:
    home = Path(tempfile.mkdtemp())
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    # before Ray is imported; the monitor (the autoscaler) inherits them
    os.environ.update(LOCAL_ONLY, HOME=str(home), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    from cap_dist.config import load_recipe
    from cap_dist.engines import prune
    from cap_dist.engines.distributed import crew as crew_module

    keep_cluster_address_private()
    port = _free_port()
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{port}")))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "gcs_server_port": port,
        "temp_dir": temp_dir, "autoscaling_config": str(config)})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    result: dict[str, Any] = {"worker_types": autoscaling_config("")["available_node_types"], "logs": []}
    handler = logging.Handler()
    handler.emit = lambda record: result["logs"].append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("cap_dist").addHandler(handler)
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        deadline = time.monotonic() + 60
        while b"autoscaler_report" not in (_internal_kv_get("__autoscaling_status") or b""):
            assert time.monotonic() < deadline, "the autoscaler reported nothing in 60 s"
            time.sleep(0.5)
        result["workers_before"] = len(_workers())
        recipe = load_recipe(str(ROOT / "jobs" / "vit4mnist.yaml"), [
            f"model.source={shared}/models/vit4mnist", f"calibration.uri={shared}/data/mnist",
            "calibration.samples=64", "calibration.batch_size=32", "prune.mode=independent", "device=cpu",
            "engine=ray", "distributed.actors=2", "distributed.num_cpus=1", "distributed.num_gpus=1",
            "distributed.placement=PACK", "distributed.schedule_timeout_s=180",
            f"output={Path(temp_dir) / 'out'}"])
        times: dict[str, float] = {}
        start_all = crew_module.Crew.start_all

        def timed_start_all(self: Any) -> None:
            start_all(self)
            times.setdefault("actors_ready", time.monotonic())

        crew_module.Crew.start_all = timed_start_all      # type: ignore[method-assign]
        def first_worker() -> None:
            while "first_worker" not in times and "finished" not in times:
                if _workers():
                    times["first_worker"] = time.monotonic()
                time.sleep(0.2)

        watcher = threading.Thread(target=first_worker, daemon=True)
        submit = time.monotonic()
        watcher.start()
        out = prune(recipe)
        times["finished"] = time.monotonic()
        nodes = [{"type": n["Resources"], "ip": n["NodeManagerAddress"]} for n in _workers()]
        result["nodes_used"] = nodes
        while _workers():
            assert time.monotonic() - times["finished"] < 180, "the workers were not released in 180 s"
            time.sleep(0.5)
        times["released"] = time.monotonic()
        result.update(seconds={k: v - submit for k, v in times.items()}, actors=len(out.manifest["actors"]),
                      sparsity=out.sparsity, layers=len(out.layers))
    finally:
        ray.shutdown()
        cluster.shutdown()
        leftovers = _processes_under(temp_dir)
        for pid in leftovers:                                  # only this run's fake nodes, by id
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        result["killed_leftovers"] = len(leftovers)
        result_path.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else ROOT.parent / "shared"))
