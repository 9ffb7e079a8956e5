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
