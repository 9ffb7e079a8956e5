"""Lose a worker node of a simulated 3-node cluster (a head without CPUs and two 1-CPU workers,
``ray.cluster_utils.Cluster``) in one phase of a real job, and report what happened (run as a script, in its own
process: it starts its own multi-node Ray, which must not meet the test run's shared cluster).

    python -m tests.cluster.node_loss RESULT.json SCENARIO [SHARED_DIR]

Scenarios: ``calibrate`` and ``solve`` prune the shared vit4mnist with 2 actors (SPREAD: one per worker node),
first undisturbed, then removing the node of one actor in that phase and adding a fresh node (as a cloud provider
replaces a preempted spot instance); ``unreplaced`` removes it for good (the run must end in a bounded, logged
wait and a clear error); ``finetune`` removes a node during Ray Train finetuning (2 workers, one per node) after
its first checkpoint and adds a fresh one. The result JSON holds the outputs, timings, logs and what was removed
when, for the test to judge.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.cluster.simulated import keep_cluster_address_private
from tests.conftest import LOCAL_ONLY

ROOT = Path(__file__).resolve().parents[2]
WORKER = {"num_cpus": 1, "memory": 3 * 2**30, "node_ip_address": "127.0.0.1"}


class Events:
    """What the disturbance did and when (monotonic seconds), and the log lines of the run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.logs: list[str] = []

    def add(self, what: str, **extra: Any) -> None:
        self.rows.append({"what": what, "t": time.monotonic(), **extra})


class Capture(logging.Handler):
    def __init__(self, events: Events) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("cap_dist"):
            self.events.logs.append(record.getMessage())


def _node_of_actor(index: int) -> str:
    """The node id that holds bundle ``index`` of the run's placement group (actor ``index``)."""
    from ray.util.placement_group import placement_group_table

    for table in placement_group_table().values():
        if table.get("name", "").startswith("cap-dist-") and table.get("state") == "CREATED":
            return table["bundles_to_node_id"][index]
    raise RuntimeError("no placement group of the run is placed")


def _remove(cluster: Any, node_id: str, events: Events, replace: bool) -> None:
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node)
    events.add("node removed", node=node_id)
    if replace:
        cluster.add_node(**WORKER)
        events.add("node added")


def _prune_recipe(shared: Path, out: Path, **extra: str) -> Any:
    from cap_dist.config import load_recipe

    overrides = [f"model.source={shared}/models/vit4mnist", f"calibration.uri={shared}/data/mnist",
                 "calibration.samples=128", "calibration.batch_size=16", "prune.mode=independent",
                 "engine=ray", "device=cpu", "distributed.actors=2", "distributed.num_cpus=1",
                 "distributed.placement=SPREAD", "distributed.schedule_timeout_s=60", f"output={out}",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return load_recipe(str(ROOT / "jobs" / "vit4mnist.yaml"), overrides)


def _blocks_of(output: Path, index: int) -> list[str]:
    """The blocks actor ``index`` holds, from the run's plan.json."""
    return [s for s in json.loads((output / "plan.json").read_text())[index]["stages"] if s.startswith("blocks.")]


def _written(output: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (output / "layers").glob("*.safetensors")}


def _disturb(cluster: Any, events: Events, phase: str, victim: int, replace: bool) -> None:
    """Wrap the driver's waits so that the node of actor ``victim`` goes in ``phase``: during calibration once
    2 batches have passed the whole chain; during solving once the victim has written a layer."""
    import ray

    from cap_dist.engines.distributed import driver

    original = driver._wait_all
    done = []

    def wait_all(refs: list[Any], desc: str | None = None, unit: str = "call") -> list[Any]:
        if not done and phase == "calibrate" and desc == "calibration steps":
            ray.wait(refs, num_returns=2)
            done.append(True)
            _remove(cluster, _node_of_actor(victim), events, replace)
        if not done and phase == "solve" and desc == "layers solved":
            output = Path(driver_output[0])
            blocks = _blocks_of(output, victim)
            deadline = time.monotonic() + 120
            while not any(name.startswith(tuple(b + "." for b in blocks)) for name in _written(output)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the victim wrote no layer in 120 s")
                time.sleep(0.01)
            done.append(True)
            events.add("written before removal", layers=_written(output))
            _remove(cluster, _node_of_actor(victim), events, replace)
        return original(refs, desc, unit)

    driver._wait_all = wait_all


driver_output: list[str] = []


def prune_scenario(cluster: Any, shared: Path, work: Path, phase: str, replace: bool) -> dict[str, Any]:
    import torch

    from cap_dist.engines import prune
    from cap_dist.output import load_sparse

    result: dict[str, Any] = {}
    events = Events()
    logging.getLogger("cap_dist").addHandler(Capture(events))
    logging.getLogger("cap_dist").setLevel(logging.INFO)
    start = time.monotonic()
    reference = prune(_prune_recipe(shared, work / "reference")) if replace else None
    result["reference_seconds"] = time.monotonic() - start
    victim = 0 if phase == "calibrate" else 1
    out = work / "disturbed"
    driver_output.append(str(out))
    recipe = _prune_recipe(shared, out, **({} if replace else {"distributed.schedule_timeout_s": "20"}))
    _disturb(cluster, events, phase, victim, replace)
    start = time.monotonic()
    try:
        disturbed = prune(recipe)
    except Exception as err:  # noqa: BLE001 - the unreplaced case must fail; the test reads how
        result.update(error=f"{type(err).__name__}: {err}", seconds=time.monotonic() - start,
                      events=[dict(r, t=r["t"] - start) for r in events.rows], logs=events.logs)
        return result
    result["seconds"] = time.monotonic() - start
    result["events"] = [dict(r, t=r["t"] - start) for r in events.rows]
    result["logs"] = events.logs
    result["manifest"] = {k: disturbed.manifest[k] for k in ("actor_starts", "recoveries", "timings")}
    result["written_after"] = _written(out)
    assert reference is not None
    expected, _ = load_sparse(str(reference.output))
    got, _ = load_sparse(str(out))
    ref_state = expected.state_dict()
    result["different_tensors"] = [k for k, v in got.state_dict().items() if not torch.equal(v, ref_state[k])]
    result["tensors"] = len(ref_state)
    result["reference_starts"] = reference.manifest["actor_starts"]
    return result


def finetune_scenario(cluster: Any, shared: Path, work: Path) -> dict[str, Any]:
    from cap_dist.config import load_recipe
    from cap_dist.engines import prune
    from cap_dist.finetune.trainer import finetune
    from cap_dist.output import load_sparse

    events = Events()
    pruned = work / "pruned"
    student = prune(_prune_recipe(shared, pruned, engine="local"))
    def recipe_for(name: str) -> Any:
        return load_recipe(str(ROOT / "jobs" / "vit4mnist.yaml"), [
            f"model.source={shared}/models/vit4mnist", f"calibration.uri={shared}/data/mnist", "device=cpu",
            f"evaluation.uri={shared}/data/mnist", "evaluation.subset=[512,576]", "evaluation.batch_size=64",
            f"output={work / name}",
            f'finetune={{"data": {{"uri": "{shared}/data/mnist", "subset": [0, 512], "batch_size": 32}}, '
            f'"epochs": 4, "lr": 0.0003, "workers": 2, "max_failures": 3, "checkpoint_every": 1, '
            f'"evaluation_every": 0, "storage_path": "{work / name / "train"}"}}'])

    start = time.monotonic()
    finetune(recipe_for("reference"), str(pruned), str(work / "reference-finetuned"), sparsity=0.5)
    reference_seconds = time.monotonic() - start
    storage = work / "finetuned" / "train"
    recipe = recipe_for("finetuned")

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list(storage.glob("*/checkpoint_epoch0001*/trainer_state.json")):
                events.add("first checkpoint seen")
                time.sleep(1.0)                        # into epoch 2, past the checkpoint
                ray_nodes = [n for n in cluster.worker_nodes]
                _remove(cluster, ray_nodes[0].node_id, events, True)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    start = time.monotonic()
    thread.start()
    summary = finetune(recipe, str(pruned), str(work / "finetuned"), sparsity=0.5)
    seconds = time.monotonic() - start
    thread.join(timeout=10)
    before, manifest = load_sparse(str(pruned))
    after, _ = load_sparse(str(work / "finetuned"))
    reference, _ = load_sparse(str(work / "reference-finetuned"))
    max_difference = max(float((a - b).abs().max()) for a, b in zip(after.state_dict().values(),
                                                                      reference.state_dict().values()))
    masks_kept = all(bool(((after.get_parameter(f"{r['layer']}.weight") == 0) ==
                           (before.get_parameter(f"{r['layer']}.weight") == 0)).all()) for r in manifest["layers"])
    return {"seconds": seconds, "reference_seconds": reference_seconds, "max_difference": max_difference,
            "summary": {k: v for k, v in summary.items() if k != "metrics"},
            "events": [dict(r, t=r["t"] - start) for r in events.rows], "masks_kept": masks_kept,
            "layers": len(manifest["layers"]), "student_sparsity": student.sparsity}


def main(result_path: Path, scenario: str, shared: Path) -> None:
    home = Path(tempfile.mkdtemp())
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ.update(LOCAL_ONLY, HOME=str(home))                 # before Ray is imported
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    keep_cluster_address_private()
    # (shutdown_at_exit=False: no SIGTERM hook, so the watcher thread of a finetune can add a node; the finally
    # below shuts the cluster down)
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "temp_dir": tempfile.mkdtemp(prefix="rn", dir="/tmp")})
    for _ in range(2):
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    result: dict[str, Any] = {"scenario": scenario}
    try:
        with tempfile.TemporaryDirectory() as work:
            if scenario == "finetune":
                result.update(finetune_scenario(cluster, shared, Path(work)))
            else:
                result.update(prune_scenario(cluster, shared, Path(work), "solve" if scenario == "unreplaced"
                                             else scenario, replace=scenario != "unreplaced"))
    except Exception as err:  # noqa: BLE001 - the test reads the reason
        result.update(crash=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-3000:])
    finally:
        ray.shutdown()
        cluster.shutdown()
    result_path.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3] if len(sys.argv) > 3 else ROOT.parent / "shared"))
