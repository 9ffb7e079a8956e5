"""A worker node lost mid-job on a simulated 3-node cluster (a head without CPUs, two 1-CPU workers; each case
in its own process through ``tests/cluster/node_loss.py``, with the shared vit4mnist): the prune replaces only the
lost actor, does not solve again what was written, and ends with the same masks and weights as an undisturbed run;
a node never replaced ends in a bounded, logged wait and a clear error; finetuning resumes from its last checkpoint
with the masks intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def _run(scenario: str, shared: Path, tmp_path: Path, timeout: int) -> dict:
    result = tmp_path / f"{scenario}.json"
    run = subprocess.run([sys.executable, "-m", "tests.cluster.node_loss", str(result), scenario, str(shared)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(result.read_text())
    assert "crash" not in out, out.get("trace")
    return out


def _same_result_only_lost_actor_replaced(out: dict, phase: str, lost: int) -> None:
    assert out["different_tensors"] == [] and out["tensors"] > 50         # same masks and weights, every tensor
    assert out["reference_starts"] == 2
    assert out["manifest"]["actor_starts"] == 3                           # 2 planned + 1 replacement, no more
    recoveries = out["manifest"]["recoveries"]
    assert [(r["phase"], r["lost"]) for r in recoveries] == [(phase, [lost])]
    assert any("lost actor(s) [%d]" % lost in line for line in out["logs"])


@pytest.mark.timeout(400)
def test_node_lost_while_solving_replaces_one_actor_and_solves_nothing_twice(shared_dir: Path,
                                                                              tmp_path: Path) -> None:
    out = _run("solve", shared_dir, tmp_path, 380)
    _same_result_only_lost_actor_replaced(out, "solving", 1)
    before = next(e for e in out["events"] if e["what"] == "written before removal")["layers"]
    assert any(name.startswith("blocks.3") for name in before)             # the lost actor had written a layer
    assert {k: out["written_after"][k] for k in before} == before          # not written (not solved) again
    assert len(out["written_after"]) == 24


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_node_lost_while_calibrating_counts_every_batch_once(shared_dir: Path, tmp_path: Path) -> None:
    """Actor 0's node goes after 2 of 8 batches passed the chain: its replacement folds all 8, the survivor
    (actor 1) only those it had not, and the Hessians, masks and weights are those of an undisturbed run."""
    out = _run("calibrate", shared_dir, tmp_path, 380)
    _same_result_only_lost_actor_replaced(out, "calibrating", 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_node_never_replaced_ends_in_a_bounded_logged_wait_and_a_clear_error(shared_dir: Path,
                                                                            tmp_path: Path) -> None:
    out = _run("unreplaced", shared_dir, tmp_path, 280)
    assert out["error"].startswith("ResourcesUnavailableError: replacing actor(s) [1]: the cluster did not place")
    assert "distributed.schedule_timeout_s" in out["error"] and "CPU" in out["error"]
    assert "resumes" in out["error"]
    waits = [line for line in out["logs"] if "waiting" in line and "actor(s) [1]" in line]
    assert waits and "1 CPU" in waits[0]                                  # said at once, with what is missing
    removed = next(e["t"] for e in out["events"] if e["what"] == "node removed")
    assert out["seconds"] - removed < 20 + 30                               # bounded: timeout + settling


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_lost_while_finetuning_resumes_from_the_last_checkpoint(shared_dir: Path, tmp_path: Path) -> None:
    out = _run("finetune", shared_dir, tmp_path, 580)
    assert [e["what"] for e in out["events"]][:2] == ["first checkpoint seen", "node removed"]
    summary = out["summary"]
    assert summary["attempts"] == 2
    assert summary["resumed_from_step"] >= 8                  # a checkpoint, not the start (8 steps an epoch)
    assert summary["steps"] == 4 * 8 and summary["epochs"] == 4
    assert out["masks_kept"] and out["layers"] == 24
    assert out["max_difference"] < 1e-5                       # the weights of the run never disturbed
