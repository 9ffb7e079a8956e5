"""One entry point for every image layout cap-dist reads, so pipelines and the CLI take a single ``--data`` URI.

Calibration and evaluation sets arrive as Parquet tables (object stores), folders with a ``labels.csv``
(the shared ImageNet samples), class sub-folders (torchvision ImageFolder exports) or the MNIST IDX files.
:func:`open_image_dataset` looks at what is at the URI and returns the matching reader; every reader gives
``dataset[i] -> (image [C, H, W] float32, label)``, ``len(dataset)``, ``dataset.records`` and ``dataset.root``,
so :func:`~cap_dist.data.iter_image_batches` (and its ``skip_bad``) works on all of them.

    data = open_image_dataset("s3://bucket/imagenet-val/", spec.input, indices=sample_indices(50_000, 512, 0))
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cap_dist.data.images import (
    LABELS_FILE,
    ClassImageFolder,
    LabelledImageFolder,
    build_image_transform,
)
from cap_dist.data.mnist import SPLIT_FILES, load_mnist, preprocess_mnist
from cap_dist.data.parquet import PARQUET_SUFFIX, ParquetImageDataset, RowRecords

MNIST_MARKER = SPLIT_FILES["test"][0]

ACCEPTED_LAYOUTS = (
    f"a {PARQUET_SUFFIX} file, or a folder of {PARQUET_SUFFIX} files (binary 'image' column, optional 'label')",
    f"a folder with {LABELS_FILE} (columns file,label) and the images it lists",
    "a folder of class sub-folders, <root>/<class>/<image>.jpg|png|... (ImageFolder layout)",
    f"an MNIST folder holding {SPLIT_FILES['test'][0]} and {SPLIT_FILES['test'][1]}",
)


class UnknownImageLayoutError(ValueError):
    """A URI exists but holds none of the image layouts :func:`open_image_dataset` reads."""


class MnistDataset(Dataset):
    """MNIST digits from the official IDX files, preprocessed per the model spec.

    A one-channel spec at 28 px (the native MNIST input) uses :func:`~cap_dist.data.preprocess_mnist`
    (``x/255``, then mean/std); any other spec (resizing, a crop, three channels) goes through PIL and
    :func:`~cap_dist.data.build_image_transform`, as photos do. The uint8 digits stay in memory (7.8 MB for the
    test split) and are preprocessed per item.

    Args:
        root: folder (path or fsspec URI) with the gzipped IDX files of ``split``.
        input_spec: the model spec's ``input`` dict.
        split: ``"test"`` (``t10k-*``) or ``"train"``.
        indices: digits to use, in this order (default all).
    """

    def __init__(self, root: str, input_spec: Mapping[str, Any], split: str = "test",
                 indices: Sequence[int] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.split = split
        # preprocess_mnist wants scale "x/255"; build_image_transform also accepts None for the same scaling.
        self._mnist_spec = {**dict(input_spec), "scale": "x/255"}
        self.transform = build_image_transform(input_spec)
        images, labels = load_mnist(self.root, split)
        if indices is not None:
            index = torch.as_tensor([int(i) for i in indices], dtype=torch.long).reshape(-1)
            bad = index[(index < 0) | (index >= images.shape[0])]
            if bad.numel():
                raise IndexError(f"indices {bad[:5].tolist()} are outside the {images.shape[0]} digits of "
                                 f"{self.root} ({split})")
            rows = index
            images, labels = images[index], labels[index]
        else:
            rows = torch.arange(images.shape[0])
        self.images, self.labels = images, labels
        crop = input_spec.get("center_crop", input_spec.get("size"))
        self._native = (int(input_spec.get("channels", len(input_spec.get("mean", [0])))) == 1
                        and input_spec.get("resize_short_side") is None and (crop is None or int(crop) == 28))
        self.records = RowRecords(labels.numpy(), [SPLIT_FILES[split][0]], np.zeros(len(labels), dtype=np.int64),
                                  rows.numpy())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        digit = self.images[index]
        if self._native:
            image = preprocess_mnist(digit.unsqueeze(0), self._mnist_spec)[0]
        else:
            image = self.transform(Image.fromarray(digit.numpy()))  # uint8 [28, 28] -> mode "L"
        return image, int(self.labels[index])


def _describe(uri: str, reason: str) -> str:
    layouts = "\n".join(f"  - {layout}" for layout in ACCEPTED_LAYOUTS)
    return f"{uri}: {reason}. open_image_dataset reads:\n{layouts}"


def _construct(reader: type[Dataset], layout: str, uri: str, input_spec: Mapping[str, Any],
               kw: dict[str, Any]) -> Dataset:
    """Build ``reader``, first checking ``kw`` against its parameters so a wrong option names the layout."""
    accepted = [name for name in inspect.signature(reader.__init__).parameters
                if name not in ("self", "root", "uri", "input_spec")]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise TypeError(f"{uri} is {layout}, read by {reader.__name__}, which takes {accepted}; "
                        f"unexpected option(s) {unknown}")
    return reader(uri, input_spec, **kw)


def open_image_dataset(uri: str, input_spec: Mapping[str, Any], **kw: Any) -> Dataset:
    """Open the image dataset at ``uri`` with the reader its layout needs.

    Checked in this order: a ``.parquet`` file -> :class:`ParquetImageDataset`; a folder with ``labels.csv``
    -> :class:`LabelledImageFolder`; a folder with the MNIST test IDX file -> :class:`MnistDataset`; a folder
    with ``.parquet`` files at its top level -> :class:`ParquetImageDataset`; a folder of class sub-folders
    -> :class:`ClassImageFolder`.

    Args:
        uri: path or fsspec URI (``file://``, ``s3://``, ``memory://``, ...).
        input_spec: the model spec's ``input`` dict.
        **kw: options of the chosen reader, e.g. ``indices`` (all readers), ``image_column`` /
            ``label_column`` (Parquet), ``split`` (MNIST), ``extensions`` (class folders).

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        UnknownImageLayoutError: ``uri`` holds none of the accepted layouts (the message lists them).
        TypeError: an option the chosen reader does not take.
    """
    uri = str(uri)
    build_image_transform(input_spec)  # a bad spec fails here, before any listing of a remote folder
    from cap_dist.storage import storage_errors

    with storage_errors(uri):
        return _open_image_dataset(uri, input_spec, kw)


def _open_image_dataset(uri: str, input_spec: Mapping[str, Any], kw: dict[str, Any]) -> Dataset:
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.isfile(path):
        if path.lower().endswith(PARQUET_SUFFIX):
            return _construct(ParquetImageDataset, "a Parquet file", uri, input_spec, kw)
        raise UnknownImageLayoutError(_describe(uri, "is a file but not a .parquet file"))
    if not fs.isdir(path):
        raise FileNotFoundError(_describe(uri, "does not exist"))
    entries = fs.ls(path, detail=True)
    files = {entry["name"].rstrip("/").split("/")[-1] for entry in entries if entry["type"] != "directory"}
    if LABELS_FILE in files:
        return _construct(LabelledImageFolder, f"a folder with {LABELS_FILE}", uri, input_spec, kw)
    if MNIST_MARKER in files:
        return _construct(MnistDataset, "an MNIST folder", uri, input_spec, kw)
    if any(name.lower().endswith(PARQUET_SUFFIX) and not name.startswith((".", "_")) for name in files):
        return _construct(ParquetImageDataset, "a folder of Parquet files", uri, input_spec, kw)
    try:
        return _construct(ClassImageFolder, "a folder of class sub-folders", uri, input_spec, kw)
    except ValueError as err:  # the spec is valid (checked above), so this is the folder scan failing
        raise UnknownImageLayoutError(_describe(uri, f"matches no layout ({err})")) from None
