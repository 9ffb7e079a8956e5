"""What a model's output is, which decides how two models' outputs are compared (distillation, structured
allocation trials): logits of a classifier, or the pooled embedding of an encoder."""

from __future__ import annotations

from typing import Literal

from torch import nn

ModelKind = Literal["classifier", "encoder"]


def model_kind(model: nn.Module) -> ModelKind:
    """``"encoder"`` for a timm model built without a head (``num_classes=0``: its output is the pooled
    embedding), else ``"classifier"`` (its output are logits)."""
    return "encoder" if getattr(model, "num_classes", None) == 0 else "classifier"
