"""A prune submitted to an autoscaling cluster whose head has zero workers (Ray's fake multi-node autoscaler with
cluster/aws.yaml's worker types, scaled down; tests/cluster/autoscaling.py in its own process): the driver does not
refuse it up front, the autoscaler adds a worker node, the prune finishes on it, and the node is released after
the idle timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(660)]
ROOT = Path(__file__).resolve().parents[2]


def test_prune_on_a_head_with_zero_workers_scales_up_finishes_and_releases(shared_dir: Path,
                                                                          tmp_path: Path) -> None:
    result = tmp_path / "autoscaling.json"
    run = subprocess.run([sys.executable, "-m", "tests.cluster.autoscaling", str(result), str(shared_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=640)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["workers_before"] == 0
    assert out["actors"] == 2 and out["layers"] == 24 and out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any("autoscaler" in line and "expected to add nodes" in line for line in out["logs"])
    seconds = out["seconds"]
    assert 0 < seconds["first_worker"] < seconds["actors_ready"] < seconds["finished"] < seconds["released"]
    assert all(n["ip"] == "127.0.0.1" for n in out["nodes_used"])
