"""Deploy a pruned output: export it to ONNX (the graph carries the reduced shapes of a structured prune) and check
that ONNX Runtime computes what torch computes; optionally quantize the ONNX graph's weights to int8 (ONNX Runtime's
dynamic quantization: int8 MatMul/Gemm kernels, the speed that int8 buys on a CPU).

    cap-dist onnx runs/vit4mnist-structured                      # -> runs/vit4mnist-structured/model.onnx
    path, report = export_output("runs/vit4mnist-structured")    # report: max |ORT - torch|, input shape

Needs the ``onnx`` extras (``pip install -c constraints.txt -e '.[onnx]'``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 18


class DeployError(RuntimeError):
    """The export could not be made or does not compute what torch computes."""


@dataclass(frozen=True)
class OnnxCheck:
    """How the exported graph compares with torch on random inputs."""

    max_abs_diff: float
    max_abs_output: float
    input_shape: tuple[int, ...]


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise DeployError("ONNX export needs onnx and onnxruntime: "
                          "pip install -c constraints.txt -e '.[onnx]'") from None
    return onnx, onnxruntime


def input_shape(input_spec: dict[str, Any], batch: int = 1) -> tuple[int, int, int, int]:
    """``[batch, channels, size, size]`` from an output's input preprocessing."""
    size = input_spec.get("center_crop") or input_spec.get("size")
    if not isinstance(size, int):
        raise DeployError(f"the output's input spec has no integer size (got {input_spec}); cannot shape an input")
    return batch, int(input_spec.get("channels", 3)), size, size


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, opset: int = DEFAULT_OPSET,
                dynamo: bool = False) -> str:
    """Export ``model`` (eval mode, CPU, float32) with a dynamic batch axis to ``path`` (written under a temporary
    name, then renamed). ``dynamo=False`` uses torch's TorchScript exporter (seconds; the dynamo exporter gives the
    same graph here in ~10× the time)."""
    _require_onnx()
    model = model.eval().float().cpu()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.", suffix=".onnx.tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")       # the exporter's deprecation and tracer warnings, not ours
            if dynamo:
                torch.onnx.export(model, (example,), tmp, dynamo=True, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
            else:
                torch.onnx.export(model, (example,), tmp, dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def ort_session(path: str, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (``threads``: intra-op threads, None for ORT's default)."""
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_onnx(path: str, model: nn.Module, shape: tuple[int, ...], *, atol: float = 1e-4, seed: int = 0) -> OnnxCheck:
    """Run the graph in ONNX Runtime and the model in torch on the same random batch; raise if they differ by more
    than ``atol`` relative to the output's scale."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.eval().float().cpu()(x)
    got = torch.from_numpy(ort_session(path).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    if got.shape != expected.shape or diff > atol * max(1.0, scale):
        raise DeployError(f"{path}: ONNX Runtime's output differs from torch's (shape {tuple(got.shape)} vs "
                          f"{tuple(expected.shape)}, max |diff| {diff:.3g} at output scale {scale:.3g})")
    return OnnxCheck(diff, scale, tuple(shape))


def quantize_int8(path: str, out_path: str) -> str:
    """ONNX Runtime's dynamic int8 quantization of the graph's MatMul/Gemm weights (per channel); activations are
    quantized on the fly. Convolutions stay float (ORT's dynamic ConvInteger is slower than its float conv)."""
    _require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(path, out_path, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    return out_path


def graph_weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``{initializer name: shape}`` of the exported graph (what a reader checks for the reduced widths)."""
    onnx, _ = _require_onnx()
    graph = onnx.load(path, load_external_data=False).graph
    return {init.name: tuple(init.dims) for init in graph.initializer}


def export_output(uri: str, out_path: str | None = None, *, batch: int = 2,
                  dynamo: bool = False) -> tuple[str, OnnxCheck]:
    """Export a pruning output (local folder) to ONNX beside it (``model.onnx``) and check it against torch."""
    from cap_dist.output import load_sparse

    if out_path is None and "://" in uri:
        raise DeployError(f"{uri} is not a local folder; give the ONNX file's local path (--out model.onnx)")
    model, manifest = load_sparse(uri)
    out_path = out_path or os.path.join(uri, ONNX_FILE)
    shape = input_shape(manifest.get("input", {}), batch)
    export_onnx(model, torch.zeros(shape), out_path, dynamo=dynamo)
    return out_path, check_onnx(out_path, model, shape)
