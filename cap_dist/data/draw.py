"""Draw a recipe's images: open the source, take the subset, sample N with the seed, batch them.

The same recipe gives the same images, in the same order, on every machine and every worker.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from cap_dist.data import sample_indices

Batch = tuple[torch.Tensor, torch.Tensor | None]


def draw_indices(cfg: Any, total: int, purpose: str = "calibration") -> list[int]:
    """Indices of the source's items a data section selects: ``subset`` = [start, stop), then ``samples`` of it
    drawn with ``seed`` (all of it when None); identical on every machine."""
    start, stop = cfg.subset if cfg.subset is not None else (0, total)
    if not 0 <= start < stop <= total:
        raise ValueError(f"{purpose}.subset=[{start}, {stop}) is outside the {total} items of {cfg.uri}")
    available = stop - start
    wanted = cfg.samples if cfg.samples is not None else available
    if wanted > available:
        raise ValueError(f"{purpose}.samples={wanted} but {cfg.uri} has only {available} items in the subset "
                         f"[{start}, {stop}); lower {purpose}.samples or widen the subset")
    return [start + i for i in sample_indices(available, wanted, cfg.seed)]


def draw_batches(cfg: Any, input_spec: dict[str, Any], purpose: str = "calibration") -> list[Batch]:
    """Preprocessed ``(x, y)`` batches for a :class:`cap_dist.config.DataConfig`.

    y is None when no item has a label; otherwise unlabelled items carry -1 (metrics skip them, Fisher
    calibration draws their labels from the model).
    """
    from cap_dist.data.sources import open_image_dataset

    dataset = open_image_dataset(cfg.uri, input_spec)
    indices = draw_indices(cfg, len(dataset), purpose)
    xs: list[torch.Tensor] = []
    ys: list[int | None] = []
    skipped: list[str] = []
    for i in indices:
        try:
            x, y = dataset[i]
        except ValueError as err:  # undecodable image: the readers raise ValueError subclasses naming the file
            if cfg.on_bad_image == "error":
                raise ValueError(f"{purpose}: {err} (set {purpose}.on_bad_image=skip to skip such images)") from None
            skipped.append(str(err))
            continue
        xs.append(x)
        ys.append(None if y is None or int(y) < 0 else int(y))     # readers mark unlabelled items with -1
    if skipped:
        warnings.warn(f"{purpose}: skipped {len(skipped)} image(s) that failed to decode, first: {skipped[0]}",
                      RuntimeWarning, stacklevel=2)
    if not xs:
        raise ValueError(f"{purpose}: no usable images in {cfg.uri}")
    labelled = any(y is not None for y in ys)
    batches: list[Batch] = []
    for b in range(0, len(xs), cfg.batch_size):
        x = torch.stack(xs[b:b + cfg.batch_size])
        y = torch.tensor([-1 if v is None else v for v in ys[b:b + cfg.batch_size]]) if labelled else None
        batches.append((x, y))
    return batches
