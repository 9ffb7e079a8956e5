"""The user's path, end to end: ``ray start --head`` on 127.0.0.1, ``ray job submit --working-dir`` of a prune
recipe whose model, data and output all live on the S3 test server, wait, check the output, stop the cluster.

The cluster is stopped by terminating exactly the processes of this head (found by its private temp dir), not
with ``ray stop``, which would also kill the test run's own Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import signal

import pytest
import yaml

from cap_dist import storage
from cap_dist.output import load_sparse
from tests.storage.test_s3 import tree, upload_assets
from tests.s3server import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _head_processes(*markers: str) -> list[int]:
    """PIDs whose command line names this head's temp dir (raylet, GCS, dashboard, log monitor, workers) or its
    GCS address (the Ray client server, whose command line has no temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if any(m.encode() in cmdline for m in markers):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stop_head(*markers: str) -> None:
    """Stop exactly this head: SIGTERM its processes, wait, SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        pids = _head_processes(*markers)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = _head_processes(*markers)
            time.sleep(0.2)
        if not pids:
            return


@pytest.mark.timeout(600)
def test_ray_job_submit_prunes_from_and_to_s3(s3: str, tmp_path: Path) -> None:
    # ray[default] is a dependency of cap-dist: its `ray` command must sit beside this Python (no skip).
    assert shutil.which("ray", path=str(BIN)), f"no `ray` command beside {sys.executable}; reinstall cap-dist"
    upload_assets(s3)
    recipe = tree(s3, f"{s3}/job-out", engine="ray")
    storage.atomic_write_bytes(f"{s3}/recipes/job.yaml", yaml.safe_dump(recipe).encode())

    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")          # no cloud-metadata probe from the dashboard
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")               # socket paths must stay short
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    address = f"http://127.0.0.1:{dash_port}"

    # The runtime env a user ships: the project's file plus where the S3-compatible store is.
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] = dict(runtime_env.get("env_vars") or {}, AWS_ENDPOINT_URL_S3=os.environ[
        "AWS_ENDPOINT_URL_S3"], AWS_EC2_METADATA_DISABLED="true", RAY_USAGE_STATS_ENABLED="0")
    runtime_env.pop("working_dir", None)                               # given on the command line
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                        "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                        # Every port of its own: the job agent's default HTTP port (52365) may be held by another
                        # Ray on the machine (the test run's shared one), and then no agent ever takes jobs.
                        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                        f"--ray-client-server-port={free_port()}"],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        timings["ray start"] = time.perf_counter() - start
        submit = time.perf_counter()
        command = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
                   f"--runtime-env={env_file}", "--", "python", "-m", "cap_dist", "prune", "--config",
                   f"{s3}/recipes/job.yaml", "distributed.actors=2"]
        deadline = time.monotonic() + 240
        while True:
            job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
            # A fresh head's job agent registers a few seconds after `ray start` returns (longer on a busy
            # machine); until then the server refuses the submission before creating any job, so retry.
            if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        timings["job submit → done"] = time.perf_counter() - submit
        assert job.returncode == 0, f"job failed:\n{job.stdout[-4000:]}\n{job.stderr[-2000:]}"
        assert "succeeded" in job.stdout and f"wrote {s3}/job-out" in job.stdout
    finally:
        _stop_head(temp_dir, f"--address=127.0.0.1:{gcs_port}\0")
        left = _head_processes(temp_dir, f"--address=127.0.0.1:{gcs_port}\0")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray head survived: {left}"
    timings["total"] = time.perf_counter() - start

    model, manifest = load_sparse(f"{s3}/job-out")
    assert manifest["engine"] == "ray" and len(manifest["actors"]) == 2
    assert manifest["sparsity"] == pytest.approx(0.5)
    assert storage.read_bytes(f"{s3}/job-out/plan.json")
    print("ray job submit end to end: " + json.dumps({k: round(v, 1) for k, v in timings.items()}, ensure_ascii=False))
