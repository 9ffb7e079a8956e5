"""Model weights as one safetensors file or as safetensors shards plus an index, local or on any URI.

Why shards: a model that does not fit one process (a 10 B+ encoder on a head node) is never gathered anywhere.
Each Ray actor writes its own shard of the pruned model, the driver writes only the index, and every reader
(``load_sparse``, ``eval``, ``export``, finetune workers, the next gradual step) reads either layout. The layout
is Hugging Face's, which timm and ``transformers`` load as they are::

    model-00001-of-00004.safetensors ... model-00004-of-00004.safetensors
    model.safetensors.index.json    {"metadata": {"total_size": N}, "weight_map": {tensor name: shard file}}

A weights location is the single file's URI or the index's URI; the functions below take either.

    files = open_weights("runs/x/model.safetensors.index.json")      # which tensor lives in which file
    state = load_weights("runs/x/model.safetensors.index.json", digests=manifest["files"])  # checksums verified
    part = load_weight_subset(uri, ["blocks.0.attn.qkv.weight"])      # ranged reads of those tensors only

Files are written byte-deterministically (one metadata key, see :func:`write_safetensors`), so identical runs
write identical shards and their checksums can be compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file as safetensors_save_file

from cap_dist.storage import (atomic_write_bytes, commit_local_file, load_tensor_subset, read_bytes,
                              safetensors_header, storage_errors)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
METADATA = {"format": "pt"}
"""The one metadata key every weights file carries: safetensors writes its metadata map in per-process hash
order, so with two keys identical runs would write different bytes (versions and facts go in the manifest)."""


class CorruptOutputError(ValueError):
    """An output (or weights location) whose files are missing, truncated or do not match their checksums."""


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard file name: ``model-00002-of-00004.safetensors`` for ``index=2, count=4`` (1-based)."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index} of {count}: shards are numbered 1..{count}")
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def is_index(uri: str) -> bool:
    return uri.endswith(".index.json")


def _folder(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[0]


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


# ----------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class WrittenFile:
    """A weights file just written: its name in the folder, sha256, size in bytes, and the tensor bytes it
    holds (what an index's ``total_size`` adds up)."""

    name: str
    sha256: str
    size: int
    tensor_bytes: int
    keys: tuple[str, ...]


def write_safetensors(uri: str, tensors: Mapping[str, torch.Tensor]) -> WrittenFile:
    """Write ``tensors`` to ``uri`` atomically (temporary name, then rename) and byte-deterministically.

    Local files are written straight from the tensors (no second in-memory copy of a large shard) and hashed
    from disk; other URIs go through one buffer (an S3 PUT is all-or-nothing). Tensors must be contiguous CPU
    tensors without shared storage (see :func:`cap_dist.models.source.state_dict_for_save`)."""
    name = uri.rstrip("/").rpartition("/")[2]
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    keys = tuple(sorted(tensors))
    with storage_errors(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        local = isinstance(fs, LocalFileSystem)
    if not local:
        data = safetensors_save(dict(tensors), METADATA)
        atomic_write_bytes(uri, data)
        return WrittenFile(name, hashlib.sha256(data).hexdigest(), len(data), tensor_bytes, keys)
    commit_local_file(path, lambda tmp: safetensors_save_file(dict(tensors), tmp, METADATA))
    digest, size = _file_digest(path)
    return WrittenFile(name, digest, size, tensor_bytes, keys)


def _file_digest(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def index_bytes(shards: Iterable[WrittenFile]) -> bytes:
    """The index of a set of shards (keys sorted, so the same shards give the same bytes)."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        total += shard.tensor_bytes
        for key in shard.keys:
            if key in weight_map:
                raise ValueError(f"tensor {key!r} is in two shards ({weight_map[key]} and {shard.name}); every "
                                 "tensor must have one owner")
            weight_map[key] = shard.name
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(body, indent=1).encode()


# ----------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class WeightFiles:
    """Which file holds each tensor of a weights location (a single file, or the shards of an index)."""

    uri: str                           # the single file or the index
    folder: str                        # where the shard names are resolved
    weight_map: dict[str, str]         # tensor name -> file name (in ``folder``)

    @property
    def names(self) -> list[str]:
        """The files, each once, in order."""
        return sorted(set(self.weight_map.values()))

    def file_uri(self, name: str) -> str:
        return _join(self.folder, name)

    def keys_by_file(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{file name: [tensor names]}`` for ``keys`` (default: every tensor)."""
        keys = list(self.weight_map) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.weight_map]
        if missing:
            raise KeyError(f"{self.uri} has no tensors {missing[:5]}")
        grouped: dict[str, list[str]] = {}
        for key in keys:
            grouped.setdefault(self.weight_map[key], []).append(key)
        return grouped


def open_weights(uri: str) -> WeightFiles:
    """The layout of a weights location: for an index, its ``weight_map`` (validated); for a single file, the
    tensor names of its header. Errors name the file and say what is wrong."""
    uri = uri.rstrip("/")
    folder, name = _folder(uri), uri.rpartition("/")[2]
    if not is_index(uri):
        header = safetensors_header(uri)
        return WeightFiles(uri, folder, {k: name for k in header if not k.startswith("__")})
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise CorruptOutputError(f"{uri} is missing: the sharded weights' index names which shard holds each "
                                 "tensor") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptOutputError(f"{uri} is not valid JSON ({err}); it should be a safetensors index "
                                 '{"metadata": {...}, "weight_map": {tensor: shard file}}') from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors") and "/" not in v
            for k, v in weight_map.items()):
        raise CorruptOutputError(f"{uri} is not a safetensors index: it needs a non-empty 'weight_map' of tensor "
                                 "names to shard files (*.safetensors) in the same folder")
    return WeightFiles(uri, folder, dict(weight_map))


def _check_digest(where: str, data_or_path: bytes | str, expected: str | None, size: int | None) -> None:
    if isinstance(data_or_path, bytes):
        actual_size = len(data_or_path)
        digest = hashlib.sha256(data_or_path).hexdigest() if expected else None
    else:
        digest, actual_size = _file_digest(data_or_path) if expected else (None, os.path.getsize(data_or_path))
    if size is not None and actual_size != size:
        raise CorruptOutputError(f"{where} is corrupt: {actual_size:,} bytes where {size:,} were written "
                                 "(truncated or replaced); copy it again or rerun the job")
    if expected is not None and digest != expected:
        raise CorruptOutputError(f"{where} is corrupt: its sha256 does not match the manifest (sparsity.json); "
                                 "copy it again or rerun the job")


def read_verified_file(uri: str, expected: str | None = None, size: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, its sha256 (and size) checked first when given. Local files are
    hashed from disk then memory-mapped (no second copy); others are read once into memory."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            _check_digest(uri, path, expected, size)
            return safetensors_load_file(path)
        data = read_bytes(uri)
    except FileNotFoundError:
        raise CorruptOutputError(f"{uri} is missing (the weights name it); copy it again or rerun the job") from None
    _check_digest(uri, data, expected, size)
    try:
        return safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CorruptOutputError(f"{uri} is not a valid safetensors file: {exc}") from None


def load_weights(uri: str, digests: Mapping[str, str] | None = None,
                 sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a weights location (a single file or all shards of an index).

    ``digests`` / ``sizes``: ``{file name: sha256 / bytes}`` (a manifest's ``files`` / ``sizes``); each file
    listed there is checked before it is read, so a truncated or tampered shard is an error naming it.
    An index whose shards disagree with it (a tensor missing from its shard, or one the index does not list) is
    refused too."""
    files = open_weights(uri)
    state: dict[str, torch.Tensor] = {}
    for name, keys in files.keys_by_file().items():
        part = read_verified_file(files.file_uri(name), (digests or {}).get(name), (sizes or {}).get(name))
        _check_shard_keys(files, name, keys, part)
        state.update(part)
    return state


def _check_shard_keys(files: WeightFiles, name: str, keys: list[str], found: Iterable[str]) -> None:
    found = set(found)
    missing, extra = sorted(set(keys) - found), sorted(found - set(keys))
    if missing or extra:
        raise CorruptOutputError(f"{files.file_uri(name)} does not match {files.uri}: "
                                 f"{len(missing)} tensor(s) listed but absent {missing[:3]}, {len(extra)} present "
                                 f"but not listed {extra[:3]}")


def load_weight_subset(uri: str, keys: Iterable[str],
                       rows: Mapping[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a weights location, with ranged reads of the files that hold them (no whole-file fetch);
    ``rows``: ``{key: (start, stop)}`` reads only those rows (dim 0) of a tensor."""
    files = open_weights(uri)
    out: dict[str, torch.Tensor] = {}
    for name, names in files.keys_by_file(keys).items():
        out.update(load_tensor_subset(files.file_uri(name), names, {k: v for k, v in (rows or {}).items()
                                                                    if k in names}))
    return out


def weights_headers(uri: str) -> dict[str, dict]:
    """``{file URI: safetensors header}`` of every file of a weights location (headers only, no tensor read);
    each header also carries ``__data_start__``. For an index, a shard's header must list exactly the tensors
    the index gives it."""
    files = open_weights(uri)
    headers = {}
    for name, keys in files.keys_by_file().items():
        header = safetensors_header(files.file_uri(name))
        _check_shard_keys(files, name, keys, (k for k in header if not k.startswith("__")))
        headers[files.file_uri(name)] = header
    return headers


def weight_file_names(uri: str) -> list[str]:
    """The file names (in the weights' folder) a weights location consists of: the index and its shards, or
    the single file."""
    files = open_weights(uri)
    return [uri.rstrip("/").rpartition("/")[2], *files.names] if is_index(uri) else files.names
