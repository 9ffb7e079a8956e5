"""Sparse recovery: finetune a pruned model on Ray Train with FSDP2, keeping its masks exactly, distilling from
the dense model (see :mod:`cap_dist.finetune.trainer` for the launcher, :mod:`cap_dist.finetune.loop` for the
worker loop).

Modules, one job each: ``config`` (recipe sections, no torch), ``masks``, ``losses``, ``schedule`` (pure
torch, no Ray), ``data`` (training images per worker), ``checkpoint`` (sharded checkpoints through Ray
Train), ``results`` (the finetuned output), ``loop`` and ``trainer`` (Ray Train). Importing this package
imports none of them, so ``cap_dist.config`` can use ``finetune.config`` without torch or Ray.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from cap_dist.finetune.trainer import finetune

        return finetune
    raise AttributeError(f"module 'cap_dist.finetune' has no attribute {name!r}")
