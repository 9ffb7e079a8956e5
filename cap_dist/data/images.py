"""Labelled image folders (``labels.csv`` + image files) preprocessed exactly as the model spec says.

Calibration and evaluation must see the same pixels the reference accuracy was measured on, so the
transform is built from the spec's ``input`` dict rather than chosen per script. Files are opened
through fsspec, so a folder on S3 reads the same way as a local one.

    model, spec = load_model_dir("../shared/models/tf_efficientnet_lite0")
    data = LabelledImageFolder("../shared/data/imagenet-samples", spec.input)
    for images, labels in iter_image_batches(data, batch_size=32):
        ...
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

LABELS_FILE = "labels.csv"

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
_SUPPORTED_SCALES = (None, "x/255")


class ImageDecodeError(ValueError):
    """An image listed in ``labels.csv`` is missing or cannot be decoded."""


def _channels(input_spec: Mapping[str, Any]) -> int:
    channels = int(input_spec.get("channels", len(input_spec.get("mean", [0, 0, 0]))))
    if channels not in (1, 3):
        raise ValueError(f"input spec channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
    return channels


@dataclass(frozen=True)
class _ConvertMode:
    """PIL mode conversion as a transform step (greyscale PNGs and CMYK JPEGs both occur in the wild)."""

    mode: str

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


def build_image_transform(input_spec: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor ``[C, H, W]`` as the model spec's ``input`` dict describes.

    Keys: ``resize_short_side`` (resize so the short side has this length), ``interpolation``
    (bicubic, bilinear, nearest, lanczos; default bilinear), ``center_crop`` (default ``size``),
    ``mean`` / ``std`` (per channel, on the 0..1 scale), ``channels`` (1 or 3), ``scale`` (``x/255``).
    """
    scale = input_spec.get("scale")
    if scale not in _SUPPORTED_SCALES:
        raise ValueError(f"input spec scale={scale!r} is not supported; pixels are scaled as 'x/255'")
    interpolation = input_spec.get("interpolation", "bilinear")
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"input spec interpolation={interpolation!r} is not one of {sorted(_INTERPOLATION)}")
    channels = _channels(input_spec)
    mean, std = input_spec.get("mean"), input_spec.get("std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"input spec needs mean and std with one entry per channel ({channels}) and std > 0, "
                         f"got mean={mean!r} std={std!r}")
    steps: list[Callable[[Any], Any]] = [_ConvertMode("L" if channels == 1 else "RGB")]
    short_side = input_spec.get("resize_short_side")
    if short_side is not None:
        steps.append(transforms.Resize(int(short_side), interpolation=_INTERPOLATION[interpolation]))
    crop = input_spec.get("center_crop", input_spec.get("size"))
    if crop is not None:
        steps.append(transforms.CenterCrop(int(crop)))
    steps += [transforms.ToTensor(), transforms.Normalize([float(m) for m in mean], [float(s) for s in std])]
    return transforms.Compose(steps)


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``labels.csv``: a file relative to the folder and its class index."""

    file: str
    label: int


def read_labels_csv(root: str, labels_file: str = LABELS_FILE) -> list[ImageRecord]:
    """Read ``<root>/labels.csv`` (columns ``file`` and ``label``; others are ignored)."""
    fs, root_path = fsspec.core.url_to_fs(str(root))
    path = f"{root_path.rstrip('/')}/{labels_file}"
    if not fs.isfile(path):
        raise FileNotFoundError(f"image folder {root} has no {labels_file}; expected {root}/{labels_file} "
                                "with columns file,label")
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = {"file", "label"} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{root}/{labels_file} lacks column(s) {sorted(missing)}; its header is {reader.fieldnames}")
    records = []
    for line, row in enumerate(reader, start=2):
        file = (row["file"] or "").strip()
        if not file or file.startswith("/") or ".." in file.split("/"):
            raise ValueError(f"{root}/{labels_file} line {line}: file {file!r} must be a path inside the folder")
        try:
            label = int(row["label"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{root}/{labels_file} line {line}: label {row['label']!r} is not an integer") from err
        records.append(ImageRecord(file, label))
    if not records:
        raise ValueError(f"{root}/{labels_file} lists no images")
    return records


def _select(records: list[ImageRecord], indices: Sequence[int] | None, what: str) -> list[ImageRecord]:
    """``records`` at ``indices`` in that order (all when None); an index outside them is an IndexError."""
    if indices is None:
        return records
    bad = [i for i in indices if not 0 <= int(i) < len(records)]
    if bad:
        raise IndexError(f"indices {bad[:5]} are outside the {len(records)} {what}")
    return [records[int(i)] for i in indices]


class LabelledImageFolder(Dataset):
    """Images listed in ``labels.csv``, preprocessed per the model spec.

    ``dataset[i]`` returns ``(image [C, H, W] float32, label)`` and raises :class:`ImageDecodeError`
    for a missing or undecodable file; :func:`iter_image_batches` can skip those instead.

    Args:
        root: folder (path or fsspec URI) holding ``labels.csv`` and the images it names.
        input_spec: the model spec's ``input`` dict (see :func:`build_image_transform`).
        indices: rows of ``labels.csv`` to use, in this order (default: all).
    """

    def __init__(self, root: str, input_spec: Mapping[str, Any], indices: Sequence[int] | None = None,
                 labels_file: str = LABELS_FILE) -> None:
        self.root = str(root).rstrip("/")
        self._fs, self._root_path = fsspec.core.url_to_fs(self.root)
        records = read_labels_csv(self.root, labels_file)
        self.records = _select(records, indices, f"rows of {self.root}/{labels_file}")
        self.transform = build_image_transform(input_spec)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        return self.transform(self.open_image(record.file)), record.label

    def open_image(self, file: str) -> Image.Image:
        """Decode one image fully (so a truncated file fails here, not later)."""
        try:
            with self._fs.open(f"{self._root_path.rstrip('/')}/{file}", "rb") as f:
                data = f.read()
        except FileNotFoundError as err:
            raise ImageDecodeError(f"{self.root}/{file} is listed in labels.csv but does not exist") from err
        return decode_image_bytes(data, f"{self.root}/{file}")


def _decoded(dataset: LabelledImageFolder, skip_bad: bool, skipped: list[str],
             ) -> Iterator[tuple[torch.Tensor, int, str]]:
    """``(image, label, file)`` in dataset order; undecodable files go to ``skipped`` or raise."""
    for i, record in enumerate(dataset.records):
        try:
            image, label = dataset[i]
        except ImageDecodeError:
            if not skip_bad:
                raise
            skipped.append(record.file)
            continue
        yield image, label, record.file


def _warn_skipped(dataset: LabelledImageFolder, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} undecodable image(s) in {dataset.root}: {', '.join(skipped[:5])}",
                      RuntimeWarning, stacklevel=3)


def iter_image_batches(dataset: LabelledImageFolder, batch_size: int, skip_bad: bool = False,
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images [B, C, H, W], labels [B])`` in dataset order.

    With ``skip_bad``, undecodable files are left out and one warning at the end gives their count and
    the first few names; otherwise the first one raises :class:`ImageDecodeError`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    skipped: list[str] = []
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for image, label, _ in _decoded(dataset, skip_bad, skipped):
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
    _warn_skipped(dataset, skipped)


@dataclass
class LoadedImages:
    """Images held in memory: ``images [N, C, H, W]`` float32, ``labels [N]`` int64, the files used and
    the files skipped as undecodable."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    skipped: list[str]


def load_imagenet_samples(root: str, input_spec: Mapping[str, Any], indices: Sequence[int] | None = None,
                          skip_bad: bool = False) -> LoadedImages:
    """Load (a subset of) a labelled image folder into memory, preprocessed per ``input_spec``.

    Meant for small sets (a 224² RGB image is 0.6 MB as float32); stream larger ones with
    :func:`iter_image_batches`.
    """
    dataset = LabelledImageFolder(root, input_spec, indices=indices)
    skipped: list[str] = []
    decoded = list(_decoded(dataset, skip_bad, skipped))
    _warn_skipped(dataset, skipped)
    if not decoded:
        raise ValueError(f"no image in {dataset.root} could be decoded ({len(skipped)} skipped)")
    images, labels, files = zip(*decoded)
    return LoadedImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(files), skipped)


# --------------------------------------------------------------------------------------------------------
# Class sub-folders (torchvision ImageFolder layout) and decoding of in-memory bytes.
#
# Many exported datasets come as ``root/<class>/<image>`` without a labels.csv; reading that layout here
# (rather than through torchvision.datasets.ImageFolder) keeps fsspec URIs, the spec-driven transform and
# the skip-and-count convention of iter_image_batches identical for both layouts.

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def decode_image_bytes(data: bytes | None, where: str) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) fully, so a truncated image fails here, not later.

    ``where`` names the image in the error (a file, or a row of a table). Raises :class:`ImageDecodeError`.
    """
    if data is None:
        raise ImageDecodeError(f"{where} holds no image (null value)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode {where}: {err}") from err
    return image


def scan_class_folders(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                       ) -> tuple[list[str], list[ImageRecord]]:
    """Find ``root/<class>/**/<image>`` files: classes are the sub-folder names sorted (label = position, as
    torchvision's ImageFolder numbers them), images are matched by extension (case-insensitive), hidden
    files and folders are ignored.

    Returns:
        ``(classes, records)`` with ``records`` sorted by class, then path; ``file`` is relative to ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class sub-folders, or none of them holds an image with one of ``extensions``.
    """
    fs, root_path = fsspec.core.url_to_fs(str(root))
    if not fs.isdir(root_path):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    folders = sorted((entry["name"].rstrip("/") for entry in fs.ls(root_path, detail=True)
                      if entry["type"] == "directory" and not entry["name"].rstrip("/").split("/")[-1].startswith(".")),
                     key=lambda name: name.split("/")[-1])
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; the ImageFolder layout is {root}/<class>/<image>")
    classes = [folder.split("/")[-1] for folder in folders]
    records: list[ImageRecord] = []
    for label, (name, folder) in enumerate(zip(classes, folders)):
        for path in sorted(fs.find(folder)):
            relative = path[len(folder):].lstrip("/") if path.startswith(folder) else path.split("/")[-1]
            parts = relative.split("/")
            if any(part.startswith(".") for part in parts) or not relative.lower().endswith(suffixes):
                continue
            records.append(ImageRecord(f"{name}/{relative}", label))
    if not records:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise ValueError(f"the class sub-folders of {root} ({shown}) hold no image files with extensions "
                         f"{list(suffixes)}")
    return classes, records



class ClassImageFolder(LabelledImageFolder):
    """Images in class sub-folders, ``root/<class>/<image>`` (torchvision's ImageFolder layout), preprocessed
    per the model spec. Classes are the sub-folder names sorted; an image's label is its class's position.

    Behaves like :class:`LabelledImageFolder` (``dataset[i] -> (image, label)``, ``records``, works with
    :func:`iter_image_batches` and its ``skip_bad``), and adds ``classes`` and ``class_to_idx``.

    Args:
        root: folder (path or fsspec URI) holding one sub-folder per class.
        input_spec: the model spec's ``input`` dict (see :func:`build_image_transform`).
        indices: positions in the sorted image list to use, in this order (default: all).
        extensions: file endings that count as images (case-insensitive).
    """

    def __init__(self, root: str, input_spec: Mapping[str, Any], indices: Sequence[int] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = str(root).rstrip("/")
        self._fs, self._root_path = fsspec.core.url_to_fs(self.root)
        classes, records = scan_class_folders(self.root, extensions)
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.records = _select(records, indices, f"images under {self.root}")
        self.transform = build_image_transform(input_spec)

    def open_image(self, file: str) -> Image.Image:
        """Decode one image fully (so a truncated file fails here, not later)."""
        try:
            with self._fs.open(f"{self._root_path.rstrip('/')}/{file}", "rb") as f:
                data = f.read()
        except FileNotFoundError as err:
            raise ImageDecodeError(f"{self.root}/{file} was found when the folder was scanned but no longer "
                                   "exists; open the folder again") from err
        return decode_image_bytes(data, f"{self.root}/{file}")
