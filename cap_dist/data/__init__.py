"""Data: calibration and evaluation sets (labelled image folders, MNIST IDX files), preprocessed as the
model spec says, and seeded sampling so every run and every worker draws the same calibration subset."""

from __future__ import annotations

import torch

from cap_dist.data.images import (
    ImageDecodeError,
    ImageRecord,
    LabelledImageFolder,
    LoadedImages,
    build_image_transform,
    iter_image_batches,
    load_imagenet_samples,
    read_labels_csv,
)
from cap_dist.data.mnist import IdxFormatError, load_mnist, preprocess_mnist, read_idx


def sample_indices(n_total: int, n: int, seed: int) -> list[int]:
    """``n`` distinct indices from ``range(n_total)``, sorted, the same for the same arguments on any machine."""
    if n_total < 0 or not 0 <= n <= n_total:
        raise ValueError(f"cannot sample n={n} distinct indices from n_total={n_total}; need 0 <= n <= n_total")
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_total, generator=generator)[:n].tolist())


__all__ = [
    "IdxFormatError",
    "ImageDecodeError",
    "ImageRecord",
    "LabelledImageFolder",
    "LoadedImages",
    "build_image_transform",
    "iter_image_batches",
    "load_imagenet_samples",
    "load_mnist",
    "preprocess_mnist",
    "read_idx",
    "read_labels_csv",
    "sample_indices",
]
