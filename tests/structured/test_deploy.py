"""ONNX export of a structured output: the graph has the reduced widths and ONNX Runtime matches torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("CI"):                          # `make test` installs the onnx extras: CI must run these
    import onnxruntime  # noqa: F401
pytest.importorskip("onnxruntime", reason="the onnx extras are not installed (pip install -e '.[onnx]')")

from cap_dist.cli import main  # noqa: E402
from cap_dist.deploy import DeployError, check_onnx, graph_weight_shapes, ort_session, quantize_int8  # noqa: E402
from cap_dist.engines import prune  # noqa: E402
from cap_dist.output import load_sparse  # noqa: E402
from tests.engines.local.test_pipeline import workdir  # noqa: E402,F401
from tests.structured.test_output import _recipe  # noqa: E402


def test_cli_exports_the_reduced_graph_and_ort_matches_torch(workdir: Path, capsys) -> None:
    recipe = _recipe(workdir, "onnx", sparsity=0.0)
    prune(recipe)
    model, _ = load_sparse(recipe.output)
    assert main(["onnx", recipe.output, "--int8"]) == 0
    assert "ONNX Runtime matches torch" in capsys.readouterr().out
    path = Path(recipe.output, "model.onnx")
    widths = {tuple(s) for s in graph_weight_shapes(str(path)).values()}
    fc2 = model.blocks[0].mlp.fc2
    assert fc2.in_features < 64 and (fc2.in_features, fc2.out_features) in widths | {t[::-1] for t in widths}
    x = torch.randn(3, 3, 32, 32)
    for name in ("model.onnx", "model.int8.onnx"):                # batch axis is dynamic; int8 stays close
        got = ort_session(str(Path(recipe.output, name))).run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), model(x), atol=0.05 if "int8" in name else 1e-4)
    with pytest.raises(DeployError, match="differs"):
        check_onnx(str(path), torch.nn.Sequential(model, torch.nn.Softplus()), (2, 3, 32, 32))
    assert Path(quantize_int8(str(path), str(path) + ".q")).exists()


def test_removed_branches_export_and_ort_matches_torch(workdir: Path) -> None:
    recipe = _recipe(workdir, "onnx-branches", sparsity=0.0)
    recipe = recipe.model_copy(update={"structured": recipe.structured.model_copy(
        update={"target": 0.45, "max_fraction": 0.5, "branches": True})})
    prune(recipe)
    model, manifest = load_sparse(recipe.output)
    assert any(r["kept"] == 0 for r in manifest["structured"])
    assert main(["onnx", recipe.output]) == 0
    x = torch.randn(2, 3, 32, 32)
    got = ort_session(str(Path(recipe.output, "model.onnx"))).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)
