"""Reading and writing through fsspec URIs (local paths, file://, s3://, memory://).

Writes are atomic: the bytes go to a temporary name beside the target and are then moved into
place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` via a temporary name and a rename (or copy-then-delete on object stores)."""
    fs, path = _fs(uri)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
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
    import json
    import struct

    fs, path = _fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
    with fs.open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100 << 20:
            raise ValueError(f"{uri} is not a valid safetensors file: header of {size} bytes")
        header = json.loads(f.read(size))
    header["__data_start__"] = 8 + size
    return header


def load_tensor_subset(uri: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Read only ``keys`` from a safetensors file, local or remote, with ranged reads (no whole-file fetch).

    Each actor of the distributed engine reads just the weights of its own blocks this way.
    """
    header = safetensors_header(uri)
    start = header["__data_start__"]
    missing = [k for k in keys if k not in header]
    if missing:
        raise KeyError(f"{uri} has no tensors {missing[:5]}")
    fs, path = _fs(uri)
    out: dict[str, torch.Tensor] = {}
    with fs.open(path, "rb") as f:
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            info = header[key]
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = bytearray(f.read(end - begin))
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            out[key] = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw else torch.empty(
                info["shape"], dtype=dtype)
    return out
