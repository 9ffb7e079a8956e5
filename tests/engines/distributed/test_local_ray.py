"""The local Ray cap-dist starts itself (engine=ray or finetune without an address, the demo): on 127.0.0.1, with
the local-only settings in place before Ray is imported, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cap_dist.engines.distributed import local_ray

REPO = Path(__file__).resolve().parents[3]


def _bare_env(home: Path) -> dict[str, str]:
    """A shell with no Ray settings at all, as a user's."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(REPO)}


@pytest.mark.timeout(240)
def test_connect_without_an_address_starts_ray_on_loopback_and_cleans_up(tmp_path: Path) -> None:
    """What `cap-dist prune engine=ray` does with no cluster named: the engine connects before the driver imports
    Ray; the node sits on 127.0.0.1, Ray's processes see a HOME holding ray_bootstrap_config.yaml while this
    process keeps the user's HOME, and the temporary folders are gone once the process exits."""
    script = (
        "import os, sys, types\n"
        "from cap_dist.engines.distributed.local_ray import connect\n"
        "connect(types.SimpleNamespace(distributed=types.SimpleNamespace(address=None)))\n"
        "import ray\n"
        "from ray._private import ray_constants\n"
        "@ray.remote(num_cpus=0)\n"
        "def home():\n"
        "    return os.environ['HOME']\n"
        "ray_home = ray.get(home.remote())\n"
        "print(ray.util.get_node_ip_address(), ray.nodes()[0]['NodeManagerAddress'], ray_constants.ENABLE_RAY_CLUSTER)\n"
        "print(os.path.exists(os.path.join(ray_home, 'ray_bootstrap_config.yaml')), os.environ['HOME'] == sys.argv[1])\n"
        "print(ray_home)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_bare_env(tmp_path),
                          capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["127.0.0.1", "127.0.0.1", "False"]
    assert lines[1].split() == ["True", "False"]            # Ray's HOME was the temporary one while it ran ...
    assert not Path(lines[2]).exists()                       # ... and is gone once the process has exited


def test_connect_restores_the_users_home_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalRay.stop puts every variable it set back as it was (set or unset)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    handle = local_ray.LocalRay(home=str(tmp_path / "h"), temp_dir=str(tmp_path / "t"),
                                saved_env={"HOME": str(tmp_path), "HF_HUB_OFFLINE": None})
    os.environ.update(HOME="/elsewhere", HF_HUB_OFFLINE="1")
    monkeypatch.setattr("ray.shutdown", lambda: None)
    handle.stop()
    handle.stop()                                            # idempotent
    assert os.environ["HOME"] == str(tmp_path) and "HF_HUB_OFFLINE" not in os.environ


def test_ray_imported_without_local_settings_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads its node-address switch at import: imported without it, a 'local' node would sit on the
    external interface, so a strict session (the demo's) refuses before starting anything."""
    import ray

    # The test run's shared Ray may already be up in this process; the session would then use it. Stand in for a
    # process where it is not: the refusal comes before anything would start (or touch) a Ray.
    started: list[bool] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(True))
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    with pytest.raises(local_ray.LocalRayError, match="imported before cap-dist could keep it on 127.0.0.1"):
        with local_ray.local_ray_session(2):
            pass
    assert not started


def test_the_test_run_uses_the_package_settings() -> None:
    """One home for the loopback settings: the test run applies the package's dict (plus test-only keys)."""
    from tests.conftest import LOCAL_ONLY

    assert LOCAL_ONLY.items() >= local_ray.LOCAL_ONLY.items()
    assert all(os.environ[k] == v for k, v in LOCAL_ONLY.items())
