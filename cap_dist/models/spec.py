"""Build a model from a folder holding ``model.json`` + ``model.safetensors``, and pick its prunable layers.

The json says how to build the module (a timm architecture and its kwargs, plus optional head / norm
overrides), how to preprocess inputs, and the dense reference accuracy; the weights are a plain
state_dict in safetensors, so loading never unpickles code. Files are opened through fsspec, so the
same call works for a local folder today and an ``s3://`` or ``memory://`` URI later.

    model, spec = load_model_dir("../shared/models/vit4mnist")
    layers = find_prunable_layers(model)            # {"blocks.0.attn.qkv": Linear, ...}
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import timm
import timm.models
import torch
from torch import nn

MODEL_JSON = "model.json"
DEFAULT_WEIGHTS = "model.safetensors"

# Module-name components that mark the input embedding (kept dense by default: few input columns,
# and every later layer depends on it).
EMBEDDING_NAMES = ("patch_embed", "conv_stem", "stem")
# Module-name components that mark a classifier head (kept dense by default).
HEAD_NAMES = ("head", "head_dist")

_MAX_KEYS_SHOWN = 5


class ModelLoadError(ValueError):
    """A model folder exists but its json or weights cannot build the described module."""


@dataclass
class ModelSpec:
    """What ``model.json`` says about a model.

    Attributes:
        architecture: ``"timm:<name>"``: a registered timm model name or a timm model class name.
        create_kwargs: keyword arguments for the timm builder (after head/norm overrides are parsed out).
        input: preprocessing description (``size``, ``resize_short_side``, ``interpolation``,
            ``center_crop``, ``mean``, ``std``, ``channels``, ``scale``), consumed by ``cap_dist.data``.
        reference_accuracy: every ``reference_*`` field of the json, e.g.
            ``{"reference_top1_on_mnist_test": 0.9791}``.
        weights: file name of the safetensors state_dict inside the folder, or of the index of its shards
            (``model.safetensors.index.json``).
        head: the json's head override (e.g. ``"replace model.head with Sequential(...)"``), if any.
        norm_layer: the json's norm-layer override (e.g. ``"torch.nn.LayerNorm with eps=1e-5"``), if any.
        source: the folder (path or URI) the spec was read from.
        raw: the whole json, untouched.
    """

    architecture: str
    create_kwargs: dict[str, Any]
    input: dict[str, Any]
    reference_accuracy: dict[str, float]
    weights: str = DEFAULT_WEIGHTS
    head: str | None = None
    norm_layer: str | dict[str, Any] | None = None
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> "ModelSpec":
        """Validate a parsed ``model.json``; errors name the file and the field."""
        where = f"{source}/{MODEL_JSON}" if source else MODEL_JSON
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        architecture = raw.get("architecture")
        if not isinstance(architecture, str) or not architecture.startswith("timm:") or len(architecture) <= 5:
            raise ModelLoadError(f"{where}: 'architecture' must be a string 'timm:<name>' "
                                 f"(e.g. 'timm:tf_efficientnet_lite0'), got {architecture!r}")
        create_kwargs = raw.get("create_kwargs", {})
        if not isinstance(create_kwargs, dict):
            raise ModelLoadError(f"{where}: 'create_kwargs' must be an object, got {type(create_kwargs).__name__}")
        input_spec = raw.get("input", {})
        if not isinstance(input_spec, dict):
            raise ModelLoadError(f"{where}: 'input' must be an object, got {type(input_spec).__name__}")
        weights = raw.get("weights", DEFAULT_WEIGHTS)
        if not isinstance(weights, str) or not weights.endswith((".safetensors", ".safetensors.index.json")):
            raise ModelLoadError(f"{where}: 'weights' must name a .safetensors file or a sharded safetensors "
                                 f"index (*.safetensors.index.json); pickled checkpoints are not loaded; got "
                                 f"{weights!r}")
        head = raw.get("head")
        if head is not None and not isinstance(head, str):
            raise ModelLoadError(f"{where}: 'head' must be a string such as 'replace model.head with "
                                 f"Sequential(Linear(64,128), GELU(), Linear(128,10))', got {head!r}")
        reference = {k: float(v) for k, v in raw.items()
                     if k.startswith("reference_") and isinstance(v, (int, float))}
        return cls(architecture=architecture, create_kwargs=dict(create_kwargs), input=dict(input_spec),
                   reference_accuracy=reference, weights=weights, head=head, norm_layer=raw.get("norm_layer"),
                   source=source, raw=raw)

    @property
    def timm_name(self) -> str:
        return self.architecture.removeprefix("timm:")


# ----------------------------------------------------------------------------------------------------
# Overrides described in model.json


_HEAD_TARGET = re.compile(r"replace\s+model\.([A-Za-z_][\w.]*)\s+with\s+", re.IGNORECASE)
_LAYER_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\(([^()]*)\)\s*(?:,|$)")
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
}


def _split_call_args(args: str) -> list[str]:
    return [a.strip() for a in args.split(",") if a.strip()]


def parse_head(description: str) -> tuple[str, nn.Module]:
    """Parse ``"replace model.<attr> with Sequential(Linear(a,b), GELU(), Linear(b,c))"``.

    Supported layers: ``Linear(in, out)`` (``bias=False`` allowed), ``Dropout(p)``, and the
    parameter-free activations GELU, ReLU, SiLU, Tanh, Sigmoid, Identity.

    Returns:
        The attribute path to replace (``"head"``) and the new module.
    """
    target = _HEAD_TARGET.search(description)
    if target is None:
        raise ModelLoadError(f"cannot read the head override {description!r}: expected the form "
                             "'replace model.head with Sequential(Linear(64,128), GELU(), Linear(128,10))'")
    rest = description[target.end():].lstrip()
    if not rest.startswith("Sequential("):
        raise ModelLoadError(f"head override {description!r}: only 'Sequential(...)' heads are supported")
    depth, end = 0, -1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch == ")":
            end = i
            break
    if end < 0:
        raise ModelLoadError(f"head override {description!r}: unbalanced parentheses in Sequential(...)")
    body = rest[len("Sequential("):end].strip()
    layers: list[nn.Module] = []
    pos = 0
    while pos < len(body):
        match = _LAYER_CALL.match(body, pos)
        if match is None:
            raise ModelLoadError(f"head override {description!r}: cannot parse layer at {body[pos:]!r}")
        layers.append(_build_head_layer(match.group(1), _split_call_args(match.group(2)), description))
        pos = match.end()
    if not layers:
        raise ModelLoadError(f"head override {description!r}: Sequential() has no layers")
    return target.group(1), nn.Sequential(*layers)


def _build_head_layer(name: str, args: list[str], description: str) -> nn.Module:
    try:
        if name == "Linear":
            positional = [a for a in args if "=" not in a]
            keywords = dict(a.replace(" ", "").split("=", 1) for a in args if "=" in a)
            if len(positional) != 2 or set(keywords) - {"bias"}:
                raise ValueError("Linear takes (in_features, out_features[, bias=True|False])")
            bias = keywords.get("bias", "True") == "True"
            return nn.Linear(int(positional[0]), int(positional[1]), bias=bias)
        if name == "Dropout":
            return nn.Dropout(float(args[0]) if args else 0.5)
        if name in _ACTIVATIONS:
            if args:
                raise ValueError(f"{name} takes no arguments here")
            return _ACTIVATIONS[name]()
    except ValueError as err:
        raise ModelLoadError(f"head override {description!r}: bad {name}({', '.join(args)}): {err}") from err
    raise ModelLoadError(f"head override {description!r}: unsupported layer {name!r}; supported: Linear, Dropout, "
                         f"{', '.join(_ACTIVATIONS)}")


_LAYERNORM = re.compile(r"\b(?:torch\.)?(?:nn\.)?LayerNorm\b")
_EPS = re.compile(r"\beps\s*=\s*([0-9.]+(?:[eE][+-]?\d+)?)")


def parse_norm_layer(description: str | dict[str, Any]) -> Any:
    """Parse a norm-layer override into a factory for timm's ``norm_layer`` kwarg.

    Accepts ``{"type": "LayerNorm", "eps": 1e-5}`` or text naming ``torch.nn.LayerNorm`` with ``eps=<x>``.
    """
    if isinstance(description, dict):
        kind, eps = description.get("type"), description.get("eps")
        if kind != "LayerNorm" or not isinstance(eps, (int, float)):
            raise ModelLoadError(f"norm_layer {description!r}: expected {{'type': 'LayerNorm', 'eps': <number>}}")
        return partial(nn.LayerNorm, eps=float(eps))
    if isinstance(description, str) and _LAYERNORM.search(description):
        eps = _EPS.search(description)
        return partial(nn.LayerNorm, eps=float(eps.group(1))) if eps else nn.LayerNorm
    raise ModelLoadError(f"norm_layer {description!r}: only LayerNorm overrides are supported, e.g. "
                         "'torch.nn.LayerNorm with eps=1e-5' or {'type': 'LayerNorm', 'eps': 1e-5}")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError as err:
        raise ModelLoadError(f"head override names model.{path}, but the model has no {parent_path!r}") from err
    if not hasattr(parent, attr):
        raise ModelLoadError(f"head override names model.{path}, but {type(parent).__name__} has no {attr!r}")
    setattr(parent, attr, module)


# ----------------------------------------------------------------------------------------------------
# Building and loading


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the (randomly initialised) module that ``spec`` describes; never downloads weights."""
    kwargs = dict(spec.create_kwargs)
    if spec.norm_layer is not None:
        kwargs["norm_layer"] = parse_norm_layer(spec.norm_layer)
    name = spec.timm_name
    try:
        if timm.is_model(name):
            kwargs.pop("pretrained", None)
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            cls = getattr(timm.models, name, None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ModelLoadError(f"architecture {spec.architecture!r}: {name!r} is neither a registered timm "
                                     "model (timm.list_models()) nor a model class in timm.models")
            model = cls(**kwargs)
    except TypeError as err:
        raise ModelLoadError(f"architecture {spec.architecture!r} rejected create_kwargs {spec.create_kwargs}: "
                             f"{err}") from err
    if spec.head is not None:
        path, head = parse_head(spec.head)
        _set_submodule(model, path, head)
    if "structured" in spec.raw:                  # an output of structured pruning: its smaller modules
        from cap_dist.models.structures import StructureError, apply_structure_shapes

        try:
            apply_structure_shapes(model, spec.raw["structured"])
        except StructureError as err:
            raise ModelLoadError(f"{spec.source or MODEL_JSON}: {err}") from None
    return model


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _first(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return shown + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ModelLoadError` naming missing, unexpected and shape-mismatched keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} != model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with wrong shape: {_first(mismatched)}")
    raise ModelLoadError(f"weights in {source} do not match the model built from its model.json "
                         f"({'; '.join(problems)}); check 'architecture', 'create_kwargs' and 'head' in "
                         "model.json against the checkpoint")


def read_model_spec(path: str) -> ModelSpec:
    """Read and validate a model folder's ``model.json`` (local path or fsspec URI).

    Raises:
        FileNotFoundError: the folder or its ``model.json`` does not exist.
        ModelLoadError: the json is invalid.
    """
    root = str(path).rstrip("/")
    fs, root_path = fsspec.core.url_to_fs(root)
    if not fs.isdir(root_path):
        raise FileNotFoundError(f"model folder {root} does not exist; expected a folder holding {MODEL_JSON} "
                                f"and {DEFAULT_WEIGHTS}")
    json_path = _join(root_path, MODEL_JSON)
    if not fs.isfile(json_path):
        raise FileNotFoundError(f"model folder {root} has no {MODEL_JSON}; expected {_join(root, MODEL_JSON)}")
    with fs.open(json_path, "rb") as f:
        try:
            raw = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{_join(root, MODEL_JSON)} is not valid JSON: {err}") from err
    return ModelSpec.from_dict(raw, source=root)


def load_model_dir(path: str, spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec]:
    """Load a model folder (local path or fsspec URI) with ``model.json`` and safetensors weights.

    ``spec``: the folder's ``model.json`` already read (by :func:`read_model_spec`), so it is not read twice.

    Returns:
        The model in eval mode with every weight loaded (strict), and its spec.

    Raises:
        FileNotFoundError: the folder, its ``model.json`` or its weights file does not exist.
        ModelLoadError: the json is invalid or the weights do not match the described module.
    """
    root = str(path).rstrip("/")
    spec = spec if spec is not None else read_model_spec(root)
    fs, root_path = fsspec.core.url_to_fs(root)
    weights_path = _join(root_path, spec.weights)
    if not fs.isfile(weights_path):
        raise FileNotFoundError(f"model folder {root} has no weights file; expected {_join(root, spec.weights)} "
                                f"(named by 'weights' in {MODEL_JSON})")
    model = build_model(spec)
    from cap_dist.shards import load_weights

    try:
        state = load_weights(_join(root, spec.weights))     # one file (memory-mapped where local), or its shards
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"cannot read {_join(root, spec.weights)} as safetensors: {err}") from err
    check_state_dict(model, state, _join(root, spec.weights))
    model.load_state_dict(state, strict=True)
    return model.eval(), spec


# ----------------------------------------------------------------------------------------------------
# Prunable layers


def _is_prunable_type(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _classifier_modules(model: nn.Module) -> set[int]:
    """ids of every module inside ``model.get_classifier()`` (one module or a tuple of them)."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return set()
    heads = get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return {id(sub) for head in heads if isinstance(head, nn.Module) for sub in head.modules()}


def _matches(name: str, pattern: str) -> bool:
    """A module matches if its name or the name of any module that contains it matches."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def find_prunable_layers(model: nn.Module, targets: Sequence[str] | None = None,
                         ignore: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Name the layers a one-shot pruner should sparsify.

    Prunable types are ``nn.Linear`` and non-grouped ``nn.Conv2d`` (depthwise/grouped convs have no
    single input Hessian). By default the classifier (``model.get_classifier()`` and anything under
    ``head``) and the input embedding (``patch_embed``, ``conv_stem``, ``stem``) stay dense.

    Args:
        model: the module to search.
        targets: fnmatch patterns on module names (e.g. ``"blocks.*.mlp.*"``); when given, they select
            among *all* prunable-type layers, head and embedding included. A pattern matches a layer if it
            matches the layer's name or the name of a module containing it (``"blocks.0"`` selects that block).
        ignore: fnmatch patterns of layers to leave out, applied after ``targets``.

    Returns:
        ``{module name: module}`` in the model's module order.

    Raises:
        ValueError: a pattern matches no module, or nothing is left to prune.
    """
    for arg, patterns in (("targets", targets), ("ignore", ignore)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"{arg} must be a list of fnmatch patterns such as ['blocks.*.mlp.*'], got {patterns!r}")
    typed = {name: m for name, m in model.named_modules() if name and _is_prunable_type(m)}
    if targets is None:
        heads = _classifier_modules(model)
        excluded = set(HEAD_NAMES) | set(EMBEDDING_NAMES)
        chosen = {name: m for name, m in typed.items()
                  if id(m) not in heads and not excluded.intersection(name.split("."))}
    else:
        for pattern in targets:
            if not any(_matches(name, pattern) for name in typed):
                raise ValueError(f"target pattern {pattern!r} matches no Linear or non-grouped Conv2d layer; "
                                 f"layer names look like {_first(typed)}")
        chosen = {name: m for name, m in typed.items() if any(_matches(name, p) for p in targets)}
    if ignore:
        all_names = [name for name, _ in model.named_modules() if name]
        for pattern in ignore:
            if not any(_matches(name, pattern) for name in all_names):
                raise ValueError(f"ignore pattern {pattern!r} matches no module; module names look like "
                                 f"{_first(all_names)}")
        chosen = {name: m for name, m in chosen.items() if not any(_matches(name, p) for p in ignore)}
    if not chosen:
        raise ValueError(f"no prunable layers left (targets={targets!r}, ignore={ignore!r}); the model's "
                         f"Linear/Conv2d layers are {_first(typed)}")
    return chosen
