"""Real photos that ship inside registry packages, and seeded views of them, for the offline demo.

Why: calibrating a pruned ImageNet model needs natural images, and a fresh machine reaches only package
registries. scikit-image's wheel bundles a handful of photos (a cat, a cup of coffee, an astronaut, ...) and
scikit-learn's bundles two (``load_sample_images``: china, flower). Most of ``skimage.data`` is *not* in the
wheel and would be downloaded by pooch on first use, so this module never calls ``skimage.data`` functions: it
reads only the files listed in :data:`PHOTOS` straight from the installed package folders (located with
``importlib.util.find_spec``, so no download code can run and the packages are not even imported).

A few photos are too few to calibrate on, so :func:`photo_views` draws seeded random crops and flips: e.g. 64
views to calibrate on and 64 *other* views to measure agreement with the dense model on.

    calibration, evaluation = calibration_and_evaluation_views(64, 64, seed=0)
    images, labels = views_to_tensors(calibration, input_spec)        # labels: ImageNet index or -1

Labels: the ImageNet-1k class index where a photo shows one unambiguous class, checked against the dense
EfficientNet-Lite0 (``load_efficientnet_lite0_from_pypi``, centre view): coffee -> espresso (967, top-1 at 95 %),
camera -> tripod (872, top-1 at 94 %), chelsea -> tabby cat (281; the dense model ranks it third behind tiger
cat and Egyptian cat, the usual ImageNet cat confusion). ``None`` for the rest: a portrait, the rocket
(missile vs projectile), the motorcycle (ImageNet has only moped / motor scooter), galaxies, coins, the moon, a
temple, a flower; they still serve as calibration data and for agreement with the dense model.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from cap_dist.data.images import build_image_transform

DEMO_INSTALL = "pip install -c constraints.txt scikit-image scikit-learn  (or: pip install -e '.[demo]')"


class MissingPhotoPackageError(ImportError):
    """The package that ships a requested photo is not installed; the message names the pip command."""


@dataclass(frozen=True)
class PhotoSource:
    """Where a bundled photo lives and what it shows.

    Attributes:
        package: import name of the package that ships the file (``skimage``, ``sklearn``).
        pip_name: its name on PyPI.
        path: the file relative to the package folder.
        label: ImageNet-1k class index when the photo shows one unambiguous class, else None.
        description: what is in the picture.
    """

    package: str
    pip_name: str
    path: str
    label: int | None
    description: str


# Only files inside the wheels (no pooch downloads). Grey photos are returned as RGB.
PHOTOS: dict[str, PhotoSource] = {
    "chelsea": PhotoSource("skimage", "scikit-image", "data/chelsea.png", 281, "Chelsea the cat (tabby cat, 281)"),
    "coffee": PhotoSource("skimage", "scikit-image", "data/coffee.png", 967, "a cup of coffee (espresso, 967)"),
    "astronaut": PhotoSource("skimage", "scikit-image", "data/astronaut.png", None, "portrait of Eileen Collins"),
    "rocket": PhotoSource("skimage", "scikit-image", "data/rocket.jpg", None, "a Falcon 9 on its launch pad"),
    "motorcycle": PhotoSource("skimage", "scikit-image", "data/motorcycle_left.png", None,
                              "a motorcycle in a workshop (Middlebury stereo, left view)"),
    "hubble_deep_field": PhotoSource("skimage", "scikit-image", "data/hubble_deep_field.jpg", None,
                                     "Hubble deep field galaxies"),
    "camera": PhotoSource("skimage", "scikit-image", "data/camera.png", 872,
                          "the cameraman behind a camera on a tripod (grey; tripod, 872)"),
    "coins": PhotoSource("skimage", "scikit-image", "data/coins.png", None, "Greek coins (grey)"),
    "moon": PhotoSource("skimage", "scikit-image", "data/moon.png", None, "the lunar surface (grey)"),
    "china": PhotoSource("sklearn", "scikit-learn", "datasets/images/china.jpg", None, "a Chinese temple"),
    "flower": PhotoSource("sklearn", "scikit-learn", "datasets/images/flower.jpg", None, "a flower"),
}


class SamplePhoto(NamedTuple):
    """A bundled photo: ``name, image, label`` (RGB PIL image; ImageNet index or None)."""

    name: str
    image: Image.Image
    label: int | None


class PhotoView(NamedTuple):
    """One seeded crop/flip of a photo: ``name`` and ``view`` (its index among the views drawn) identify it."""

    name: str
    view: int
    image: Image.Image
    label: int | None


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package without importing it (so neither import cost nor side effects)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _photo_path(name: str) -> Path | None:
    source = PHOTOS[name]
    root = _package_dir(source.package)
    path = root / source.path if root is not None else None
    return path if path is not None and path.is_file() else None


def available_photos() -> list[str]:
    """Names in :data:`PHOTOS` whose package is installed and ships the file, in :data:`PHOTOS` order."""
    return [name for name in PHOTOS if _photo_path(name) is not None]


def load_sample_photos(names: Sequence[str] | None = None) -> list[SamplePhoto]:
    """Load bundled photos as RGB PIL images.

    Args:
        names: photos to load (keys of :data:`PHOTOS`); default: every available one. scikit-image is required
            either way; scikit-learn's two photos are added when it is installed.

    Raises:
        KeyError: an unknown name.
        MissingPhotoPackageError: a requested photo's package is not installed (or scikit-image, by default).
    """
    if names is None:
        if _photo_path("chelsea") is None:
            raise MissingPhotoPackageError(f"the sample photos ship in scikit-image, which is not installed; "
                                           f"run: {DEMO_INSTALL}")
        names = available_photos()
    unknown = [name for name in names if name not in PHOTOS]
    if unknown:
        raise KeyError(f"unknown sample photo(s) {unknown}; available: {sorted(PHOTOS)}")
    photos = []
    for name in names:
        path = _photo_path(name)
        if path is None:
            source = PHOTOS[name]
            raise MissingPhotoPackageError(f"photo {name!r} ships in {source.pip_name} ({source.path}), which is "
                                           f"not installed or lacks the file; run: {DEMO_INSTALL}")
        with Image.open(path) as image:
            photos.append(SamplePhoto(name, image.convert("RGB"), PHOTOS[name].label))
    return photos


def _crop_box(width: int, height: int, rng: random.Random, min_scale: float, max_scale: float,
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random box covering ``min_scale..max_scale`` of the area with aspect ratio in ``ratio`` (log-uniform)."""
    area = width * height * (min_scale + (max_scale - min_scale) * rng.random())
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    left = int(rng.random() * (width - w + 1))
    top = int(rng.random() * (height - h + 1))
    return left, top, left + w, top + h


def photo_views(photos: Sequence[SamplePhoto], n: int, seed: int | str, *, min_scale: float = 0.3,
                max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                flip: bool = True) -> list[PhotoView]:
    """``n`` seeded random crops (and horizontal flips) of ``photos``, cycling through the photos in order.

    The same arguments give the same views on any machine and Python version (only ``Random.random`` is used).

    Args:
        photos: from :func:`load_sample_photos`.
        n: number of views.
        seed: seed of the view stream (an int or a string).
        min_scale, max_scale: range of the crop's share of the photo's area.
        ratio: range of the crop's aspect ratio (width / height).
        flip: mirror half of the views (at random).
    """
    if not photos:
        raise ValueError("no photos to draw views from; load some with load_sample_photos()")
    if n < 0:
        raise ValueError(f"n={n} views must be >= 0")
    if not 0 < min_scale <= max_scale <= 1:
        raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"need 0 < ratio[0] <= ratio[1], got {ratio}")
    rng = random.Random(f"cap-dist photo views {seed}")
    views = []
    for index in range(n):
        photo = photos[index % len(photos)]
        box = _crop_box(*photo.image.size, rng, min_scale, max_scale, ratio)
        image = photo.image.crop(box)
        if flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(PhotoView(photo.name, index, image, photo.label))
    return views


def calibration_and_evaluation_views(n_calibration: int = 64, n_evaluation: int = 64, seed: int = 0,
                                     photos: Sequence[SamplePhoto] | None = None,
                                     ) -> tuple[list[PhotoView], list[PhotoView]]:
    """Two independent seeded view streams of the same photos: one to calibrate on, one to evaluate on."""
    photos = load_sample_photos() if photos is None else photos
    return (photo_views(photos, n_calibration, f"calibration/{seed}"),
            photo_views(photos, n_evaluation, f"evaluation/{seed}"))


def views_to_tensors(views: Sequence[PhotoView | SamplePhoto], input_spec: Mapping[str, Any],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess views as the model spec says: ``(images [N, C, H, W] float32, labels [N] int64)``, with
    label -1 where the photo has no unambiguous ImageNet class."""
    if not views:
        raise ValueError("no views to convert")
    transform = build_image_transform(input_spec)
    images = torch.stack([transform(v.image) for v in views])
    labels = torch.tensor([-1 if v.label is None else v.label for v in views], dtype=torch.long)
    return images, labels


__all__ = [
    "PHOTOS",
    "MissingPhotoPackageError",
    "PhotoSource",
    "PhotoView",
    "SamplePhoto",
    "available_photos",
    "calibration_and_evaluation_views",
    "load_sample_photos",
    "photo_views",
    "views_to_tensors",
]
