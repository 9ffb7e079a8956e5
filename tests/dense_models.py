"""Test assets shared by several test modules: a random timm model written as a model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file


def write_dense_vit(folder: Path, create_kwargs: dict[str, Any], input_spec: dict[str, Any], seed: int = 0) -> None:
    """A random timm VisionTransformer (seeded) as a model folder: model.safetensors + model.json."""
    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(**create_kwargs)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps({"architecture": "timm:VisionTransformer",
                                                   "create_kwargs": create_kwargs, "input": input_spec}))
