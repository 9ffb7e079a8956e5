"""MNIST from the official IDX files (gzipped or not), read with numpy and checked, so a wrong or
truncated download fails with a message instead of yielding garbage digits.

    images, labels = load_mnist("../shared/data/mnist")          # uint8 [10000, 28, 28], int64 [10000]
    x = preprocess_mnist(images, spec.input)                     # float32 [10000, 1, 28, 28]
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import torch

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension

SPLIT_FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxFormatError(ValueError):
    """A file is not a valid IDX file of the expected kind."""


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into a numpy array of its declared shape.

    Args:
        path: local path or fsspec URI.
        expected_magic: the big-endian magic number the file must start with (e.g. 2051 for images).

    Raises:
        FileNotFoundError: the file does not exist.
        IdxFormatError: wrong magic number, unknown type code, or data shorter/longer than the header says.
    """
    try:
        with fsspec.open(str(path), "rb", compression="infer") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"IDX file {path} does not exist") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise IdxFormatError(f"{path} is not a readable gzip file ({err}); download it again") from err
    if len(data) < 4:
        raise IdxFormatError(f"{path} is {len(data)} bytes, too short for an IDX header; download it again")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(f"{path} has magic number {magic:#010x}, expected {expected_magic:#010x}; "
                             "is it the right file (images vs labels) and not corrupted?")
    zeros, type_code, ndim = data[:2], data[2], data[3]
    if zeros != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(f"{path} does not start with an IDX header (magic {magic:#010x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path} ends inside its IDX header; download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected_bytes = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected_bytes:
        raise IdxFormatError(f"{path} holds {len(data) - header} data bytes, but its header declares shape {shape} "
                             f"({expected_bytes} bytes); the file is truncated or corrupted")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_mnist(root: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split from a folder holding the official gzipped IDX files.

    Returns:
        images: uint8 ``[N, 28, 28]``; labels: int64 ``[N]`` in 0..9.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLIT_FILES)}")
    images_file, labels_file = SPLIT_FILES[split]
    root = str(root).rstrip("/")
    images = read_idx(f"{root}/{images_file}", IMAGES_MAGIC)
    labels = read_idx(f"{root}/{labels_file}", LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{root}/{images_file} has shape {images.shape}, expected [N, 28, 28]")
    if labels.shape[0] != images.shape[0]:
        raise IdxFormatError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise IdxFormatError(f"{root}/{labels_file} has label {int(labels.max())}; MNIST labels are 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def preprocess_mnist(images: torch.Tensor, input_spec: Mapping[str, Any]) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> float32 ``[N, 1, 28, 28]``: x/255, then (x − mean)/std."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (raw MNIST pixels), got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images [N, 28, 28] or [N, 1, 28, 28], got {tuple(images.shape)}")
    scale = input_spec.get("scale", "x/255")
    if scale != "x/255":
        raise ValueError(f"input spec scale={scale!r} is not supported; MNIST pixels are scaled as 'x/255'")
    mean, std = input_spec.get("mean"), input_spec.get("std")
    if mean is None or std is None or len(mean) != 1 or len(std) != 1 or std[0] <= 0:
        raise ValueError(f"input spec needs one-channel mean and std (std > 0), got mean={mean!r} std={std!r}")
    return (images.float() / 255.0 - float(mean[0])) / float(std[0])
