"""Reading and writing through fsspec URIs (local paths, file://, s3://, memory://).

Writes are atomic: the bytes go to a temporary name beside the target and are then moved into
place, so a crash never leaves a half-written file under the final name.

S3 settings. Credentials always come from the standard AWS chain (environment, shared profile, instance or
pod role). An endpoint override for S3-compatible stores comes from the recipe's ``storage.endpoint_url`` or
the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables; :func:`configure` makes it the default
of every s3fs client in the process (all fsspec reads and writes), :func:`arrow_filesystem` hands it to
pyarrow's native S3 client (Parquet, Ray Train storage), and :func:`worker_env` carries it to Ray actors and
Ray Train workers, whose processes do not inherit the driver's environment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


class StorageError(OSError):
    """A location that cannot be read or written: says which URI, what the store answered, and what to do."""


class MissingObjectError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused the credentials, or they may not touch this location."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str | None


def s3_settings(cfg: Any = None) -> S3Settings:
    """The endpoint and region in force: the recipe's ``storage`` section first, then the standard variables."""
    endpoint = getattr(cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    region = getattr(cfg, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return S3Settings(endpoint.rstrip("/") if endpoint else None, region)


def configure(cfg: Any = None) -> S3Settings:
    """Make the endpoint/region the default of every s3fs client created from now on in this process.

    fsspec applies ``fsspec.config.conf["s3"]`` to each new S3FileSystem, so the many readers (model folders,
    image folders, MNIST, Parquet, outputs) need no storage arguments of their own. Cached s3fs instances are
    dropped so none keeps an old endpoint or old credentials.
    """
    settings = s3_settings(cfg)
    conf = dict(fsspec.config.conf.get("s3", {}))
    conf.pop("endpoint_url", None)
    client_kwargs = dict(conf.pop("client_kwargs", {}))
    client_kwargs.pop("region_name", None)
    if settings.endpoint_url:
        conf["endpoint_url"] = settings.endpoint_url
    if settings.region:
        client_kwargs["region_name"] = settings.region
    if client_kwargs:
        conf["client_kwargs"] = client_kwargs
    fsspec.config.conf["s3"] = conf
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover - s3fs is a dependency; without it s3:// fails with fsspec's own error
        pass
    return settings


def worker_env(cfg: Any = None) -> dict[str, str]:
    """Environment variables that give a Ray worker process the driver's S3 endpoint and region."""
    settings = s3_settings(cfg)
    env = {}
    if settings.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = settings.endpoint_url
    if settings.region:
        env["AWS_REGION"] = settings.region
    return env


def arrow_filesystem(uri: str, cfg: Any = None) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` for ``uri``: pyarrow's native S3 client (with the endpoint override) for
    s3://, its local filesystem for local paths, and an fsspec bridge for anything else (memory://, ...)."""
    import pyarrow.fs as pafs

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    if "s3" in _protocols(fs):
        return arrow_s3(cfg), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def arrow_s3(cfg: Any = None) -> Any:
    """pyarrow's native S3 client with the endpoint and region in force (credentials: the AWS chain)."""
    import pyarrow.fs as pafs

    settings = s3_settings(cfg)
    return pafs.S3FileSystem(endpoint_override=settings.endpoint_url, region=settings.region or "us-east-1",
                             check_directory_existence_before_creation=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)


def explain(uri: str, err: BaseException) -> str:
    """One sentence on why ``uri`` failed and what to do, for errors raised by s3fs, pyarrow or the OS."""
    settings = s3_settings()
    where = f" at {settings.endpoint_url}" if settings.endpoint_url and uri.startswith("s3") else ""
    text = str(err)
    if isinstance(err, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return (f"{uri}: access denied by the store{where} ({text.strip() or type(err).__name__}); check the "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's role) and that "
                "they may read and write this bucket")
    if "bucket does not exist" in text or "NoSuchBucket" in text:
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return f"{uri}: bucket {bucket!r} does not exist{where}; create it or fix the URI"
    if isinstance(err, FileNotFoundError):
        return f"{uri} does not exist{where}; check the path (and storage.endpoint_url for S3-compatible stores)"
    if "Could not connect" in text or "EndpointConnectionError" in text or "Connection refused" in text:
        return (f"{uri}: cannot reach the store{where} ({text.strip()}); check storage.endpoint_url / "
                "AWS_ENDPOINT_URL and the network")
    return f"{uri}: {type(err).__name__}: {text}"


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn store errors raised inside the block into a :class:`StorageError` that names ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        message = explain(uri, err)
        if message.startswith(f"{uri}: access denied"):
            raise AccessDeniedError(message) from err
        if isinstance(err, FileNotFoundError):
            raise MissingObjectError(message) from err
        raise StorageError(message) from err


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees part of it under the final name.

    Local files: a temporary name beside the target, fsync, rename. S3: one PUT (or a multipart upload, which
    becomes visible only on completion) is already all-or-nothing, so the bytes go straight to the key; other
    stores get a temporary key and a move.
    """
    with storage_errors(uri):
        _atomic_write(uri, data)


def commit_local_file(path: str, write: Callable[[str], None]) -> None:
    """Write a local file under a temporary name beside ``path`` (``write(tmp)`` fills it), fsync it and rename it
    into place, so a reader never sees it half-written; on any error the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    if "s3" in _protocols(fs):
        fs.pipe_file(path, data)
        return
    if isinstance(fs, LocalFileSystem):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        commit_local_file(path, write)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def exists(uri: str) -> bool:
    """Whether a file or object is at ``uri``."""
    with storage_errors(uri):
        fs, path = _fs(uri)
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    with storage_errors(uri):
        fs, path = _fs(uri)
        return fs.cat_file(path)


def save_tensors(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file."""
    atomic_write_bytes(uri, save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata))


def load_tensors(uri: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle)."""
    data = read_bytes(uri)
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{uri} is not a valid safetensors file: {exc}") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(uri: str) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, byte offsets), read alone."""
    import struct

    with storage_errors(uri):
        fs, path = _fs(uri)
        with fs.open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{uri} is not a valid safetensors file: {len(head)} bytes")
            size = struct.unpack("<Q", head)[0]
            if size > 100 << 20:
                raise ValueError(f"{uri} is not a valid safetensors file: header of {size} bytes")
            raw_header = f.read(size)
    header = _parse_header(raw_header, uri)
    header["__data_start__"] = 8 + size
    return header


def safetensors_header_of_bytes(data: bytes, where: str) -> dict:
    """The JSON header of a safetensors file already in memory (``where`` names it in errors)."""
    import struct

    if len(data) < 8:
        raise ValueError(f"{where} is not a valid safetensors file: {len(data)} bytes")
    size = struct.unpack("<Q", data[:8])[0]
    if 8 + size > len(data):
        raise ValueError(f"{where} is not a valid safetensors file: header of {size} bytes in {len(data)}")
    return _parse_header(data[8:8 + size], where)


def _parse_header(raw_header: bytes, where: str) -> dict:
    import json

    try:
        header = json.loads(raw_header)
    except ValueError:
        raise ValueError(f"{where} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is not a valid safetensors file: its header is not a JSON object")
    return header


def load_tensor_subset(uri: str, keys: list[str],
                       rows: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Read only ``keys`` from a safetensors file, local or remote, with ranged reads (no whole-file fetch).

    Each actor of the distributed engine reads just the weights of its own blocks this way. ``rows``:
    ``{key: (start, stop)}`` reads only those rows (along dim 0) of a tensor, one contiguous byte range: a
    finetune worker's FSDP shard of a parameter.
    """
    header = safetensors_header(uri)
    start = header["__data_start__"]
    rows = rows or {}
    missing = [k for k in keys if k not in header]
    if missing:
        raise KeyError(f"{uri} has no tensors {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    with storage_errors(uri):
        fs, path = _fs(uri)
        with fs.open(path, "rb") as f:
            chunks: dict[str, bytearray] = {}
            for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
                begin, end = header[key]["data_offsets"]
                shape = list(header[key]["shape"])
                if key in rows:
                    first, stop = rows[key]
                    if not shape or not 0 <= first <= stop <= shape[0]:
                        raise ValueError(f"{uri}: rows {first}..{stop} are outside tensor {key!r} of shape {shape}")
                    row_bytes = (end - begin) // shape[0] if shape[0] else 0
                    begin, end = begin + first * row_bytes, begin + stop * row_bytes
                    shape[0] = stop - first
                shapes[key] = shape
                f.seek(start + begin)
                chunks[key] = bytearray(f.read(end - begin))
                if len(chunks[key]) != end - begin:
                    raise ValueError(f"{uri} is truncated: tensor {key!r} needs bytes {begin}..{end} of its data")
    for key, raw in chunks.items():
        dtype = _SAFETENSORS_DTYPES[header[key]["dtype"]]
        out[key] = torch.frombuffer(raw, dtype=dtype).reshape(shapes[key]) if raw else torch.empty(
            shapes[key], dtype=dtype)
    return out


def ray_train_storage(uri: str, cfg: Any = None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    Ray Train writes checkpoints through a pyarrow filesystem; for s3:// it is given pyarrow's S3 client with
    the endpoint override already set (Ray would otherwise build one that only knows AWS), for local paths
    Ray's own default (``None``), for other fsspec stores an fsspec bridge.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path), None
    arrow_fs, path = arrow_filesystem(uri, cfg)
    return path, arrow_fs
