"""The pruning output: ``model.safetensors`` (sparse weights), ``report.parquet`` (per-layer rows) and
``sparsity.json`` (per-layer rows, the recipe and its hash, timings, and the sha256 of every file).

``sparsity.json`` is written last: it is the commit record.  A folder without it, or whose files do not
match its checksums, is not a finished output; :func:`load_sparse` says which file is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from cap_dist.config import Recipe, recipe_from_dict
from cap_dist.models.source import ModelSource
from cap_dist.storage import atomic_write_bytes, read_bytes
from cap_dist.version import __version__

MANIFEST = "sparsity.json"
WEIGHTS = "model.safetensors"
REPORT = "report.parquet"
MODEL_JSON = "model.json"


class CorruptOutputError(ValueError):
    """An output folder whose files are missing or do not match the manifest's checksums."""


class OutputTargetError(ValueError):
    """An output location a prune must not or cannot write to; found before any work starts."""


def prepare_output(recipe: Recipe) -> dict[str, Any] | None:
    """Check where a prune will write before it loads or calibrates anything, so a bad target costs seconds, not
    the whole run. Returns the manifest of a finished output of the same recipe there (to reuse), else None.

    Refused (:class:`OutputTargetError`): an output path that is a file; a location that cannot be written; a
    folder holding a finished output of another recipe, unless ``overwrite`` is set (then its manifest is removed
    first, so the folder is not a finished output again until the new one commits)."""
    import fsspec

    from cap_dist.storage import StorageError, atomic_write_bytes, storage_errors

    root = recipe.output.rstrip("/")
    with storage_errors(root):
        fs, path = fsspec.core.url_to_fs(root)
        if fs.isfile(path):
            raise OutputTargetError(f"output={root} is a file; give a folder (or a URI prefix) for the pruned model")
    try:
        manifest: dict[str, Any] | None = read_manifest(root)
    except FileNotFoundError:
        manifest = None
    except CorruptOutputError:
        manifest = {"recipe_hash": None}
    except StorageError as err:
        if isinstance(err, PermissionError):           # access denied: the store's own message says what to do
            raise
        raise OutputTargetError(f"cannot write to output={root}: {err}") from None   # e.g. a path below a file
    if manifest is not None and manifest.get("recipe_hash") == recipe.hash:
        return manifest
    if manifest is not None and not recipe.overwrite:
        written = manifest.get("written_at", "at an unknown time")
        raise OutputTargetError(f"{root} already holds a finished output of another recipe (hash "
                                f"{str(manifest.get('recipe_hash'))[:12]}, written {written}); choose another output, "
                                "or set overwrite=true to replace it")
    probe = _join(root, ".cap-dist-write-test")
    try:
        atomic_write_bytes(probe, b"")
        with storage_errors(probe):
            fs.rm(_join(path, ".cap-dist-write-test"))
    except StorageError:                     # the store's own clear error (access denied, no such bucket)
        raise
    except PermissionError:
        raise OutputTargetError(f"cannot write to output={root}: permission denied; choose a writable folder or "
                                "fix its permissions") from None
    except OSError as err:
        raise OutputTargetError(f"cannot write to output={root}: {err}") from None
    if manifest is not None:
        with storage_errors(root):
            fs.rm(_join(path, MANIFEST))
    return None


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_output(recipe: Recipe, state: dict, rows: list[dict[str, Any]], input_spec: dict[str, Any],
                 timings: dict[str, float], extra: dict[str, Any] | None = None,
                 extra_files: dict[str, str] | None = None, source: ModelSource | None = None) -> dict[str, Any]:
    """Write weights, report and (last) the manifest; the same layout from every engine.

    ``extra``: further manifest keys (``engine``, the Ray engine's actors and plan, a finetune's facts).
    ``extra_files``: ``{name: sha256}`` of further files the caller already wrote under the output (a finetune
    run's ``metrics.parquet`` and ``curves.png``), listed in the manifest and checked like the others.
    ``source``: the recipe's model source, already parsed (parsed here otherwise)."""
    root = recipe.output
    source = source if source is not None else ModelSource.of(recipe.model)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"layer": pa.array([], pa.string())})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    digests: dict[str, str] = dict(extra_files or {})
    written: list[str] = []
    try:
        digests[WEIGHTS] = _write_weights(_join(root, WEIGHTS), state)
        written.append(WEIGHTS)
        atomic_write_bytes(_join(root, REPORT), sink.getvalue())
        digests[REPORT] = _sha256(sink.getvalue())
        written.append(REPORT)
        spec = json.dumps(_model_json(source, input_spec, state), indent=1).encode()
        atomic_write_bytes(_join(root, MODEL_JSON), spec)
        digests[MODEL_JSON] = _sha256(spec)
        written.append(MODEL_JSON)
    except BaseException:
        _remove(root, written)                 # no half output: the files of this run go, the error stays
        raise
    numel = sum(r["numel"] for r in rows)
    manifest = {
        "cap_dist_version": __version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe.hash,
        "input": input_spec,
        "sparsity": sum(r["sparsity"] * r["numel"] for r in rows) / numel if numel else 0.0,
        "timings": timings,
        "layers": rows,
        "files": digests,
        **(extra or {}),
    }
    atomic_write_bytes(_join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _model_json(source: ModelSource, input_spec: dict[str, Any], state: dict) -> dict[str, Any]:
    """The output's ``model.json``; where structured pruning made modules smaller than the source's, their shapes
    go under ``structured`` so the output rebuilds (:func:`load_sparse`, or as a model source)."""
    from cap_dist.models.structures import infer_structure_shapes

    model_json = source.output_model_json(input_spec, WEIGHTS)
    shapes = infer_structure_shapes(source.meta_skeleton(), state)
    if shapes:
        model_json["structured"] = {**model_json.get("structured", {}), **shapes}
    return model_json


def _write_weights(uri: str, state: dict) -> str:
    """Write the weights atomically and return their sha256.  Local files are written straight from the
    tensors (no second in-memory copy of a multi-GB model); other URIs go through bytes."""
    import os
    import tempfile

    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from safetensors.torch import save_file

    fs, path = fsspec.core.url_to_fs(uri)
    meta = {"format": "pt"}       # one key: safetensors writes metadata in per-process hash order, so identical
    #                                runs would write different bytes with two (the version is in the manifest)
    if not isinstance(fs, LocalFileSystem):
        data = safetensors_save(state, meta)
        atomic_write_bytes(uri, data)
        return _sha256(data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, meta)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def _remove(root: str, names: list[str]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    for name in names:
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            fs.rm(target)


def read_manifest(uri: str) -> dict[str, Any]:
    try:
        raw = read_bytes(_join(uri, MANIFEST))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} holds no finished pruning output: {MANIFEST} is missing "
                                "(the run did not complete, or this is not an output folder)") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise CorruptOutputError(f"{_join(uri, MANIFEST)} is not valid JSON: {err}") from None


def read_verified(uri: str, name: str, manifest: dict[str, Any]) -> bytes:
    """A file of the output, checked against the manifest's sha256."""
    try:
        data = read_bytes(_join(uri, name))
    except FileNotFoundError:
        raise CorruptOutputError(f"{_join(uri, name)} is missing but listed in {MANIFEST}") from None
    expected = manifest.get("files", {}).get(name)
    if expected is not None and _sha256(data) != expected:
        raise CorruptOutputError(f"{_join(uri, name)} is corrupt: its sha256 does not match {MANIFEST}")
    return data


def load_sparse(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model from an output folder or URI.

    Returns:
        (model in eval mode with the sparse weights, the manifest).
    """
    manifest = read_manifest(uri)
    recipe = recipe_from_dict(manifest["recipe"], _join(uri, MANIFEST))
    model = ModelSource.of(recipe.model).skeleton()
    if MODEL_JSON in manifest.get("files", {}):      # smaller modules of a structured prune, if any
        from cap_dist.models.structures import apply_structure_shapes

        shapes = json.loads(read_verified(uri, MODEL_JSON, manifest)).get("structured")
        if shapes:
            apply_structure_shapes(model, shapes)
    state = safetensors_load(read_verified(uri, WEIGHTS, manifest))
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)
    return model.eval(), manifest


def read_report(uri: str) -> list[dict[str, Any]]:
    manifest = read_manifest(uri)
    return pq.read_table(io.BytesIO(read_verified(uri, REPORT, manifest))).to_pylist()


def sparsity_of(model: nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    return {n: float((modules[n].weight == 0).float().mean()) for n in names}


