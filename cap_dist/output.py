"""The pruning output: the sparse weights, ``report.parquet`` (per-layer rows), ``model.json`` and
``sparsity.json`` (per-layer rows, the recipe and its hash, timings, and the sha256 and size of every file).

The weights are one ``model.safetensors`` (the local engine, which holds the whole model anyway) or safetensors
shards plus ``model.safetensors.index.json`` (the Ray engine: each actor writes its own shard, so no process
holds the whole model; :mod:`cap_dist.shards`). The manifest's ``weights`` names which; every reader takes both.

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
import torch
from torch import nn

from cap_dist.config import Recipe, recipe_from_dict
from cap_dist.models.source import ModelSource
from cap_dist.shards import (INDEX, SINGLE, CorruptOutputError, WeightFiles, WrittenFile, index_bytes,
                             load_weight_subset, load_weights, open_weights, write_safetensors)
from cap_dist.storage import atomic_write_bytes, read_bytes
from cap_dist.version import __version__

MANIFEST = "sparsity.json"
WEIGHTS = SINGLE
REPORT = "report.parquet"
MODEL_JSON = "model.json"

__all__ = ["CorruptOutputError", "INDEX", "MANIFEST", "MODEL_JSON", "REPORT", "WEIGHTS", "load_output_weights",
           "check_output_sizes", "load_output_subset", "load_sparse", "prepare_output", "read_manifest", "read_report", "read_verified",
           "weights_digest", "weights_of", "write_output"]


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


def write_output(recipe: Recipe, state: dict[str, torch.Tensor] | None, rows: list[dict[str, Any]],
                 input_spec: dict[str, Any], timings: dict[str, float], extra: dict[str, Any] | None = None,
                 extra_files: dict[str, str] | None = None, source: ModelSource | None = None,
                 shards: list[WrittenFile] | None = None,
                 structured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write weights, report and (last) the manifest; the same layout from every engine.

    ``state``: the whole model, written as one ``model.safetensors``; or None with ``shards``: the shard files
    the caller's workers already wrote into the output (each with its sha256), for which only the index is
    written here — this process never sees their tensors.
    ``extra``: further manifest keys (``engine``, the Ray engine's actors and plan, a finetune's facts).
    ``extra_files``: ``{name: sha256}`` of further files the caller already wrote under the output (a finetune
    run's ``metrics.parquet`` and ``curves.png``), listed in the manifest and checked like the others.
    ``source``: the recipe's model source, already parsed (parsed here otherwise).
    ``structured``: reduced shapes to record in ``model.json`` (a sharded write of a structured model; a whole
    ``state`` records its own)."""
    if (state is None) == (shards is None):
        raise ValueError("write_output takes the whole state or the written shards, exactly one of them")
    root = recipe.output
    source = source if source is not None else ModelSource.of(recipe.model)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"layer": pa.array([], pa.string())})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    digests: dict[str, str] = dict(extra_files or {})
    sizes: dict[str, int] = {}
    written: list[str] = []
    try:
        if shards is None:
            weights = WEIGHTS
            single = write_safetensors(_join(root, WEIGHTS), state)
            digests[WEIGHTS], sizes[WEIGHTS] = single.sha256, single.size
            written.append(WEIGHTS)
        else:
            weights = INDEX
            _check_shards_on_store(root, shards)
            for shard in shards:
                digests[shard.name], sizes[shard.name] = shard.sha256, shard.size
            index = index_bytes(shards)
            atomic_write_bytes(_join(root, INDEX), index)
            digests[INDEX], sizes[INDEX] = _sha256(index), len(index)
            written.append(INDEX)
        atomic_write_bytes(_join(root, REPORT), sink.getvalue())
        digests[REPORT] = _sha256(sink.getvalue())
        written.append(REPORT)
        spec = json.dumps(_model_json(source, input_spec, weights, state, structured), indent=1).encode()
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
        "weights": weights,
        "files": digests,
        "sizes": sizes,
        **(extra or {}),
    }
    atomic_write_bytes(_join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    _remove_stale_weights(root, keep={weights, *(s.name for s in shards or [])})
    return manifest


def _model_json(source: ModelSource, input_spec: dict[str, Any], weights: str,
                state: dict[str, torch.Tensor] | None, structured: dict[str, Any] | None) -> dict[str, Any]:
    """The output's ``model.json``; where structured pruning made modules smaller than the source's, their shapes
    go under ``structured`` so the output rebuilds (:func:`load_sparse`, or as a model source). Sharded writes
    (``state`` None) record the shapes their caller passes."""
    from cap_dist.models.structures import infer_structure_shapes

    model_json = source.output_model_json(input_spec, weights)
    shapes = dict(structured or {})
    if state is not None:
        shapes.update(infer_structure_shapes(source.meta_skeleton(), state))
    if shapes:
        model_json["structured"] = {**model_json.get("structured", {}), **shapes}
    return model_json


def _check_shards_on_store(root: str, shards: list[WrittenFile]) -> None:
    """Each shard a worker reported is where it said, with the size it said (one listing: cheap; the sha256
    each writer computed is checked by every reader that reads the whole file)."""
    import fsspec

    from cap_dist.storage import storage_errors

    with storage_errors(root):
        fs, path = fsspec.core.url_to_fs(root)
        listing = {entry["name"].rstrip("/").rpartition("/")[2]: entry.get("size")
                   for entry in fs.ls(path, detail=True)}
    for shard in shards:
        if shard.name not in listing:
            raise CorruptOutputError(f"{_join(root, shard.name)} is missing: its writer reported it written")
        if listing[shard.name] is not None and int(listing[shard.name]) != shard.size:
            raise CorruptOutputError(f"{_join(root, shard.name)} has {int(listing[shard.name]):,} bytes where its "
                                     f"writer wrote {shard.size:,}")


def _remove_stale_weights(root: str, keep: set[str]) -> None:
    """Weights files of an earlier layout in the folder (a single file where shards now are, shards of another
    count) go once the new manifest is committed, so nothing in the folder contradicts it."""
    import re

    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    pattern = re.compile(r"^(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)$")
    stale = [name for name in (p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False))
             if pattern.match(name) and name not in keep]
    _remove(root, stale)


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


def weights_of(uri: str, manifest: dict[str, Any]) -> str:
    """The URI of an output's weights: its single file or its shards' index (outputs written before sharding
    have no ``weights`` key and always one ``model.safetensors``)."""
    return _join(uri, manifest.get("weights", WEIGHTS))


def load_output_weights(uri: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of an output, each file (the single file, or every shard and the index) checked against the
    manifest's sha256 and size first: a truncated or tampered shard is a :class:`CorruptOutputError` naming it."""
    location = weights_of(uri, manifest)
    if location.endswith(INDEX):
        read_verified(uri, INDEX, manifest)           # the index itself: a tampered weight_map is caught here
    try:
        return load_weights(location, manifest.get("files"), manifest.get("sizes"))
    except FileNotFoundError:
        raise CorruptOutputError(f"{location} is missing but listed in {MANIFEST}") from None


def load_output_subset(uri: str, manifest: dict[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
    """Only ``keys`` of an output's weights, by ranged reads of the files that hold them. A whole-file checksum
    would cost a whole read, so each file's size is checked against the manifest instead (a truncated or
    replaced shard is an error naming it); :func:`load_output_weights` checks the sha256."""
    files = check_output_sizes(uri, manifest, keys)
    return load_weight_subset(files.uri, keys)


def check_output_sizes(uri: str, manifest: dict[str, Any], keys: list[str] | None = None) -> WeightFiles:
    """Check that each weights file holding ``keys`` (default: all) exists with the size the manifest records
    (one metadata request per file: what ranged readers can afford); returns the weights' layout."""
    import fsspec

    from cap_dist.storage import storage_errors

    files = open_weights(weights_of(uri, manifest))
    sizes = manifest.get("sizes", {})
    for name in files.keys_by_file(keys):
        target = files.file_uri(name)
        with storage_errors(target):
            fs, path = fsspec.core.url_to_fs(target)
            if not fs.exists(path):
                raise CorruptOutputError(f"{target} is missing but listed in {files.uri}")
            size = fs.size(path)
        if name in sizes and size != sizes[name]:
            raise CorruptOutputError(f"{target} is corrupt: {size:,} bytes where {sizes[name]:,} were written "
                                     "(truncated or replaced); copy it again or rerun the job")
    return files


def weights_digest(manifest: dict[str, Any]) -> str | None:
    """One sha256 standing for an output's weights: the single file's, or for shards the sha256 of their names
    and digests (what a finetune run's name and record cite as its student)."""
    files = manifest.get("files", {})
    if manifest.get("weights", WEIGHTS) == WEIGHTS:
        return files.get(WEIGHTS)
    shards = sorted((name, digest) for name, digest in files.items() if name.startswith("model-"))
    return _sha256(json.dumps(shards).encode()) if shards else None


def structure_shapes_of(uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The reduced shapes of a structured prune recorded in the output's ``model.json`` (empty for others)."""
    if MODEL_JSON not in manifest.get("files", {}):
        return {}
    return json.loads(read_verified(uri, MODEL_JSON, manifest)).get("structured") or {}


def output_skeleton(uri: str, manifest: dict[str, Any]) -> nn.Module:
    """The randomly initialised module an output's weights fit: its recipe's model, with the smaller modules of a
    structured prune (build it under ``torch.device("meta")`` to allocate nothing)."""
    from cap_dist.models.structures import apply_structure_shapes

    recipe = recipe_from_dict(manifest["recipe"], _join(uri, MANIFEST))
    model = ModelSource.of(recipe.model).skeleton()
    apply_structure_shapes(model, structure_shapes_of(uri, manifest))
    return model


def load_sparse(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model from an output folder or URI (single file or sharded).

    Returns:
        (model in eval mode with the sparse weights, the manifest).
    """
    manifest = read_manifest(uri)
    model = output_skeleton(uri, manifest)
    state = load_output_weights(uri, manifest)
    model.load_state_dict(state, strict=True)
    return model.eval(), manifest


def read_report(uri: str) -> list[dict[str, Any]]:
    manifest = read_manifest(uri)
    return pq.read_table(io.BytesIO(read_verified(uri, REPORT, manifest))).to_pylist()


def sparsity_of(model: nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    return {n: float((modules[n].weight == 0).float().mean()) for n in names}


