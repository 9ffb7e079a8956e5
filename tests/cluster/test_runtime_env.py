"""cluster/runtime_env.yaml is a valid Ray runtime environment that keeps the upload small."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_env_parses_and_excludes_heavy_paths() -> None:
    spec = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "bench/results/"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
