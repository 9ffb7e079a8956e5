"""Training images for sparse recovery, sharded across Ray Train workers.

The source is any layout :func:`cap_dist.data.sources.open_image_dataset` reads (image folders, Parquet, an
MNIST folder) on any URI, preprocessed exactly as the model's input spec says; ``subset`` and ``samples`` pick
the same images on every worker and every attempt (seeded, as calibration does). Each worker then reads only
its share through a :class:`~torch.utils.data.DistributedSampler` (which pads so every rank runs the same
number of steps, as FSDP's collectives require).

Augmentation is "light", as in CAP's recipe, and acts on the preprocessed tensors: a random resized crop
keeping 80–100 % of the area, and a horizontal flip only for natural RGB images (a flipped digit is another
symbol).

    loader, sampler = train_loader(ft.data, input_spec, rank=0, world=2, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader: ...          # y: class index, -1 for an unlabelled image
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler


log = logging.getLogger(__name__)

UNLABELLED = -1


def draw_indices(cfg: Any, total: int, purpose: str = "finetune.data") -> list[int]:
    """The training items a data section selects (sorted): the same rule as calibration and evaluation data."""
    from cap_dist.data.draw import draw_indices as select

    return sorted(select(cfg, total, purpose))


class LightAugment:
    """Random resized crop (area 80–100 %, aspect 3/4–4/3, resized back) and an optional horizontal flip, on a
    preprocessed image ``[C, H, W]``; draws from torch's global generator (seeded per epoch and rank)."""

    def __init__(self, flip: bool, scale: tuple[float, float] = (0.8, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.flip, self.scale, self.ratio = flip, scale, ratio

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a crop with area in ``scale`` and aspect in ``ratio`` (whole image after
        ten misses, as torchvision does)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        return 0, 0, height, width

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        top, left, h, w = self.crop_box(height, width)
        if (h, w) != (height, width):
            patch = image[None, :, top:top + h, left:left + w]
            image = F.interpolate(patch, size=(height, width), mode="bilinear", align_corners=False)[0]
        if self.flip and bool(torch.rand(1) < 0.5):
            image = image.flip(-1)
        return image


def natural_images(dataset: Dataset, input_spec: Mapping[str, Any]) -> bool:
    """Whether flipping keeps the images' meaning: RGB photos yes; greyscale inputs and MNIST digits no."""
    from cap_dist.data.sources import MnistDataset

    channels = int(input_spec.get("channels", len(input_spec.get("mean", [0, 0, 0]))))
    return channels == 3 and not isinstance(dataset, MnistDataset)


def _label_of(record: Any) -> int:
    label = getattr(record, "label", None)
    return UNLABELLED if label is None or int(label) < 0 else int(label)


class TrainImages(Dataset):
    """The selected items of a source, augmented; ``(image, label)`` with -1 for unlabelled.

    With ``on_bad_image="skip"`` an undecodable item is replaced by the next decodable one (the length and thus
    every rank's step count stay fixed); with ``"error"`` it fails naming the file.
    """

    def __init__(self, source: Dataset, indices: Sequence[int], augment: LightAugment | None = None,
                 on_bad_image: str = "error") -> None:
        self.source, self.indices, self.augment, self.on_bad_image = source, list(indices), augment, on_bad_image
        records = getattr(source, "records", None)
        self.labels = ([_label_of(records[i]) for i in self.indices] if records is not None
                       else [UNLABELLED] * len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labelled(self) -> int:
        """How many of the items carry a label."""
        return sum(label != UNLABELLED for label in self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.indices)):
            i = (index + offset) % len(self.indices)
            try:
                image, label = self.source[self.indices[i]]
            except ValueError as err:    # the readers raise ValueError subclasses naming the undecodable file
                if self.on_bad_image == "error":
                    raise ValueError(f"finetune.data: {err} (set finetune.data.on_bad_image=skip to skip such "
                                     "images)") from None
                log.warning("finetune.data: skipping an undecodable image: %s", err)
                continue
            if self.augment is not None:
                image = self.augment(image)
            return image, UNLABELLED if label is None or int(label) < 0 else int(label)
        raise ValueError("finetune.data: no decodable image in the selection")


def open_train_images(cfg: Any, input_spec: Mapping[str, Any]) -> TrainImages:
    """The :class:`TrainImages` a :class:`~cap_dist.config.TrainDataConfig` describes."""
    from cap_dist.data.sources import open_image_dataset

    source = open_image_dataset(cfg.uri, input_spec)
    indices = draw_indices(cfg, len(source))
    augment = LightAugment(flip=natural_images(source, input_spec)) if cfg.augment == "light" else None
    return TrainImages(source, indices, augment, cfg.on_bad_image)


def train_loader(cfg: Any, input_spec: Mapping[str, Any], rank: int, world: int,
                 seed: int = 0) -> tuple[DataLoader, DistributedSampler, TrainImages]:
    """This worker's shuffled share of the training images, ``cfg.batch_size`` per batch.

    Returns:
        (loader, its sampler — call ``set_epoch(epoch)`` before each epoch —, the whole dataset).
    """
    dataset = open_train_images(cfg, input_spec)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=False, persistent_workers=cfg.num_workers > 0)
    return loader, sampler, dataset


def eval_shard(n_items: int, batch_size: int, rank: int, world: int) -> list[list[int] | None]:
    """Rank ``rank``'s evaluation batches (positions into the item list, strided by rank), padded with
    ``None`` so every rank runs the same number of forwards (FSDP all-gathers are collective); a ``None``
    batch is run for its collectives and its outputs are dropped."""
    mine = list(range(rank, n_items, world))
    per_rank = math.ceil(n_items / world) if n_items else 0
    n_batches = math.ceil(per_rank / batch_size) if per_rank else 0
    batches: list[list[int] | None] = [mine[b * batch_size:(b + 1) * batch_size] or None for b in range(n_batches)]
    return batches
