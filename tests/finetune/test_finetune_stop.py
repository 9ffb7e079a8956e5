"""Stopping `cap-dist finetune` as a user does. Ray Train's fit(), called from the main thread, takes SIGINT for
good (Ctrl-C would end the run silently with status 1); the finetune runs it beside the main thread, so Ctrl-C
and SIGTERM end the CLI with one line and exit 130 / 143 and the local Ray is gone. The CLI runs in its own
process with its own local Ray, as a user's would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LOCAL_ONLY
from tests.finetune.test_ray_finetune import _tree, assets  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(env, **LOCAL_ONLY, HOME=str(home), PYTHONUNBUFFERED="1")


def _forwarded(line: str) -> bool:
    """A line Ray forwarded from one of its workers ("(TrainController pid=12) ..."), not the CLI's own: Ray Train's
    internals print there, e.g. its PlacementGroupCleaner's failed address lookup while another Ray (the test
    run's) is up on the machine."""
    return re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line) is not None


@pytest.mark.parametrize("sig, code, reason", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_stopping_a_finetune_ends_with_one_line(assets: Path, tmp_path: Path,  # noqa: F811
                                                sig: int, code: int, reason: str) -> None:
    storage = tmp_path / "train"
    spec = _tree(assets, "unused", epochs=200, workers=1, storage_path=str(storage))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", "cap_dist", "finetune", "--config", str(recipe), "--student",
                             str(assets / "pruned"), "--output", str(tmp_path / "tuned")], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(storage.glob("*/checkpoint_*")):                 # stop once training has made progress
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint was written in 300 s"
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == code, err[-3000:]
    own = [line for line in err.splitlines() if not _forwarded(line)]
    assert not any("Traceback" in line for line in own), err[-8000:]
    assert err.strip().splitlines()[-1] == (f"cap-dist finetune: stopped by {reason}; run the same command again "
                                             "to resume from the last checkpoint")
    assert not (tmp_path / "tuned" / "sparsity.json").exists()
