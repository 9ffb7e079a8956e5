"""Sparse recovery: finetune a pruned model on Ray Train with FSDP2, keeping its masks exactly, distilling from
the dense model (see :mod:`cap_dist.finetune.trainer` for the launcher, :mod:`cap_dist.finetune.loop` for the
worker loop).

Its recipe sections (``finetune``, ``schedule``) live with the rest of the recipe in :mod:`cap_dist.config`.
Modules, one job each: ``masks``, ``losses``, ``schedule`` (pure
torch, no Ray), ``data`` (training images per worker), ``checkpoint`` (sharded checkpoints through Ray
Train), ``results`` (the finetuned output), ``loop`` and ``trainer`` (Ray Train), ``gradual`` (the schedule).
Importing this package imports none of them.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from cap_dist.finetune.trainer import finetune

        return finetune
    raise AttributeError(f"module 'cap_dist.finetune' has no attribute {name!r}")
