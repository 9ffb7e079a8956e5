"""Joining a Ray cluster, or starting a local one that stays on 127.0.0.1.

A Ray that cap-dist starts itself (``cap-dist prune`` with ``engine=ray`` and no address, ``cap-dist finetune``,
the demo) lives on this machine alone, so it must not reach beyond it. Ray 2.60 does by default: usage reports,
token auth, a node address on the external interface, and a dashboard process that probes the cloud-metadata
address unless ``~/ray_bootstrap_config.yaml`` exists. :data:`LOCAL_ONLY` holds the measured settings that stop
this (``../shared/ray-local.env`` documents each one); the test run's ``conftest.py`` uses the same dict.

Ray reads the node-address switch once, when it is imported, so the settings go into ``os.environ`` before this
module imports ``ray`` (nothing here imports it at module level); Ray's own processes and Ray Train's workers
inherit them. A process that joins an existing cluster (an address, ``RAY_ADDRESS``, a ``ray job submit``
driver) gets none of this: that cluster's settings are its operator's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cap_dist.config import Recipe

log = logging.getLogger(__name__)

LOCAL_ONLY: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",   # `ray start` still posts a "disabled" report without it
    "RAY_AUTH_MODE": "disabled",                            # else Ray 2.60 turns on token auth (~/.ray/auth_token)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",               # else the node address is the external interface
    "AWS_EC2_METADATA_DISABLED": "true",                    # S3 clients never probe the cloud-metadata address
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",             # it polls the cloud-metadata address too
    "HF_HUB_OFFLINE": "1",                                  # a hub lookup fails at once instead of reaching out
}


_STARTED: list["LocalRay"] = []      # the local Rays connect() started in this process, stopped at exit


class LocalRayError(RuntimeError):
    """A local Ray could not be kept on 127.0.0.1."""


def loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS) for gloo, which Ray Train's CPU workers
    use; without it gloo binds to the external interface."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def local_settings() -> dict[str, str]:
    """:data:`LOCAL_ONLY`, plus gloo on the loopback interface unless the caller chose an interface."""
    settings = dict(LOCAL_ONLY)
    loopback = loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        settings["GLOO_SOCKET_IFNAME"] = loopback
    return settings


def imported_without_settings() -> bool:
    """Whether ``ray`` was imported before the node-address switch was set (it then reads the external
    interface for anything that asks before the node exists)."""
    return "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"


@dataclass
class LocalRay:
    """A local Ray this process started, and what to undo when it stops."""

    home: str
    temp_dir: str
    saved_env: dict[str, str | None] = field(repr=False)
    stopped: bool = False

    def stop(self) -> None:
        """Shut Ray down, put the environment back, remove the temporary folders (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        import ray

        ray.shutdown()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(num_cpus: int, *, strict: bool = False, quiet: bool = False) -> LocalRay:
    """Start a Ray on 127.0.0.1 with :func:`local_settings`, an explicit CPU count (an actor that asks for more
    fails at once instead of waiting), a short temporary folder (socket paths are limited to 107 characters) and,
    for Ray's processes, a HOME holding an empty ``ray_bootstrap_config.yaml``. Caches keep their usual place
    (``XDG_CACHE_HOME`` is pinned to the real home's ``.cache`` before HOME moves).

    Args:
        strict: refuse when ``ray`` was imported before the settings (rather than rely on the explicit node
            address alone).
        quiet: Ray's own log lines off (the demo's terminal shows only its progress).

    Raises:
        LocalRayError: ray imported too early (``strict``), or the node came up on another address.
    """
    if strict and imported_without_settings():
        raise LocalRayError("Ray was imported before cap-dist could keep it on 127.0.0.1; run in a fresh process, "
                            "or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray")
    home = tempfile.mkdtemp(prefix="cap-dist-ray-home-")
    Path(home, "ray_bootstrap_config.yaml").write_text("{}\n")
    temp_dir = tempfile.mkdtemp(prefix="cdr", dir="/tmp" if os.path.isdir("/tmp") else None)
    settings = local_settings()
    real_home = os.path.expanduser("~")
    settings.setdefault("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME") or os.path.join(real_home, ".cache"))
    settings["HOME"] = home
    handle = LocalRay(home=home, temp_dir=temp_dir, saved_env={key: os.environ.get(key) for key in settings})
    os.environ.update(settings)                    # Ray's processes (and Ray Train's workers) inherit them
    import ray

    quiet_args = {"logging_level": "ERROR", "log_to_driver": False} if quiet else {}
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                 _node_ip_address="127.0.0.1", **quiet_args)
        node = ray.util.get_node_ip_address()
        if node != "127.0.0.1":
            raise LocalRayError(f"the local Ray came up on {node}, not 127.0.0.1; stopping rather than use the "
                                "network")
    except BaseException:
        handle.stop()
        raise
    return handle


@contextlib.contextmanager
def local_ray_session(num_cpus: int, *, quiet: bool = True) -> Iterator[bool]:
    """The Ray this process is already connected to (a test's cluster, a ``ray job`` driver), left running;
    otherwise a new local one (:func:`start_local_ray`, strict), shut down on the way out, also after an error or
    Ctrl-C. Yields whether it started one."""
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        yield False
        return
    handle = start_local_ray(num_cpus, strict=True, quiet=quiet)
    try:
        yield True
    finally:
        handle.stop()


def will_start_local(recipe: Recipe) -> bool:
    """Whether :func:`connect` would start a Ray of its own for this recipe (no cluster named, none joined)."""
    if recipe.distributed.address or os.environ.get("RAY_ADDRESS"):
        return False
    imported = sys.modules.get("ray")
    return imported is None or not imported.is_initialized()


def connect(recipe: Recipe) -> None:
    """Join the Ray cluster the recipe names (``distributed.address``, else ``RAY_ADDRESS``), or start a local one
    (:func:`start_local_ray`, every CPU of this machine, stopped when the process exits); a process already
    connected (a ``ray job submit`` driver, a test) stays on its cluster.

    Call it before anything imports ``ray`` where it can start a local Ray (the engines and the finetune do)."""
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if not will_start_local(recipe):
        import ray

        if not ray.is_initialized():
            ray.init(address=recipe.distributed.address or os.environ["RAY_ADDRESS"])
    else:
        handle = start_local_ray(os.cpu_count() or 1)
        _STARTED.append(handle)
        atexit.register(handle.stop)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's core worker installs a crash handler for SIGTERM that aborts the process (exit -6, a stack dump);
        # put back the caller's (the CLI's), so SIGTERM unwinds and the run cleans up after itself.
        signal.signal(signal.SIGTERM, on_sigterm)


def stop_started() -> None:
    """Stop every local Ray :func:`connect` started in this process (their workers and training runs end with
    them). The CLI calls it on Ctrl-C / SIGTERM before its one line, so no worker log forwarded afterwards comes
    below that line."""
    while _STARTED:
        _STARTED.pop().stop()
