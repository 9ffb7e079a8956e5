"""Test-run settings: everything stays on 127.0.0.1.

Ray 2.60 and the S3 clients reach beyond the machine by default (usage reports, cloud-metadata
probes, token auth, the external interface); these settings, measured on this kind of machine,
stop that.  They are set before any test imports Ray or an S3 client.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cap_dist.engines.distributed.local_ray import LOCAL_ONLY as PACKAGE_LOCAL_ONLY  # imports no Ray

LOCAL_ONLY = {
    **PACKAGE_LOCAL_ONLY,
    # Tests only: the local S3 server (moto) takes any credentials; boto must find some without looking further.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # torch.distributed's gloo (FSDP2 on CPU, Ray Train workers) binds to loopback, not the external interface.
    "GLOO_SOCKET_IFNAME": "lo",
}
for key, value in LOCAL_ONLY.items():
    os.environ[key] = value

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder beside the checkout. A user's fresh clone may lack it, so tests that need
    it skip there, saying why; CI always has it, so under CI (``CI`` set) its absence fails the run instead of
    silently skipping the real-model tests."""
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the shared models and data at {SHARED}")
        pytest.skip(f"needs the shared models and data at {SHARED} (absent in a fresh clone)")
    return SHARED


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole test run, on 127.0.0.1 only.

    HOME points at a folder holding an empty ray_bootstrap_config.yaml: without it Ray's dashboard
    process probes the cloud metadata address at start.  num_cpus is explicit so actors that ask for
    more than exists fail fast instead of waiting.
    """
    import tempfile

    import ray

    home = tmp_path_factory.mktemp("rayhome")
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")             # socket paths must stay short
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved_home is not None:
            os.environ["HOME"] = saved_home


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (moto, child process) on 127.0.0.1 for the test run; any credentials pass."""
    from tests.s3server import start_s3_server

    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the test S3 server, with AWS_ENDPOINT_URL_S3 pointing every client at it.

    Yields ``s3://<bucket>``; the endpoint reaches s3fs (fsspec's defaults), pyarrow and Ray workers through
    :mod:`cap_dist.storage`, exactly as a user's environment variable would.
    """
    import uuid

    from cap_dist import storage

    bucket = f"cap-dist-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    storage.configure()
    try:
        yield f"s3://{bucket}"
    finally:
        monkeypatch.undo()
        storage.configure()
