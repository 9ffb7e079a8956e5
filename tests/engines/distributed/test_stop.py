"""Stopping a Ray run as a user does: Ctrl-C (SIGINT) and SIGTERM (``ray job stop``, a scheduler) end
``cap-dist prune`` with one line and exit 130 / 143, the layers already written stay, and the same command
resumes from them. The CLI runs in its own process with its own local Ray, as a user's would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LOCAL_ONLY
from tests.engines.distributed.test_engine import assets, tree  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[3]


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")     # keeps Ray's dashboard off the network
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(env, **LOCAL_ONLY, HOME=str(home), PYTHONUNBUFFERED="1")


def _start(recipe: Path, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cap_dist", "prune", "--config", str(recipe)], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code, reason", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_stop_ends_with_one_line_keeps_layers_and_a_rerun_resumes(assets: Path, tmp_path: Path,  # noqa: F811
                                                                  sig: int, code: int, reason: str) -> None:
    spec = dict(tree(assets, "vit_wide", f"stop-{code}", mode="independent"),
                distributed={"actors": 2, "num_cpus": 1})
    out = Path(spec["output"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(spec))
    proc = _start(recipe, tmp_path)
    deadline = time.monotonic() + 300
    while not list((out / "layers").glob("*.safetensors")):          # stop once solving has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no layer was written in 300 s"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cap-dist prune: stopped by {reason};") and "resume" in last
    assert not (out / "sparsity.json").exists()                       # not a finished output
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "layers").glob("*.safetensors")}
    assert kept
    rerun = _start(recipe, tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert (out / "sparsity.json").exists()
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in (out / "layers").glob("*.safetensors"))
            if n in kept} == kept                                     # solved once, read back on the rerun
