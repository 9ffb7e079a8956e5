"""The `cap-dist` command: solve a saved layer end to end, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cap_dist.cli import main

from tests.solvers.synthetic import correlated_problem


def test_solve_writes_pruned_weight_and_mask(tmp_path: Path, capsys) -> None:
    w, _, h = correlated_problem(rows=8, cols=32, samples=256, seed=0, dtype=torch.float32)
    save_file({"weight": w.reshape(8, 2, 4, 4).contiguous(), "hessian": h}, tmp_path / "layer.safetensors")
    out = tmp_path / "out" / "pruned.safetensors"
    code = main(["solve", "--weight", str(tmp_path / "layer.safetensors"), "--hessian",
                 str(tmp_path / "layer.safetensors"), "--sparsity", "0.75", "--block-size", "16", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    result = load_file(out)
    assert result["weight"].shape == (8, 2, 4, 4)
    assert int((~result["mask"]).sum()) == 192
    assert torch.all(result["weight"][~result["mask"]] == 0)
    assert summary["sparsity"] == 0.75 and 0 < summary["relative_error"] < 1
    assert not list(out.parent.glob("*.tmp"))


def test_solve_bad_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    save_file({"w": torch.randn(4, 8)}, tmp_path / "layer.safetensors")
    code = main(["solve", "--weight", str(tmp_path / "layer.safetensors"), "--hessian",
                 str(tmp_path / "layer.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    assert "has no tensor 'weight' (it has: w)" in capsys.readouterr().err
    code = main(["solve", "--weight", str(tmp_path / "missing.safetensors"), "--hessian", "x",
                 "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    code = main(["solve", "--weight", str(tmp_path / "junk.safetensors"), "--hessian", "x",
                 "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_python_dash_m_is_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "cap_dist", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("cap-dist ")
