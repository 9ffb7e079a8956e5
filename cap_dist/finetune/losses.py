"""Training losses of sparse recovery: distillation from the dense model, mixed with labels.

CAP recovers accuracy by distilling the pruned model towards its own dense original, which needs no labels
and transfers the dense model's "dark knowledge" (Hinton et al., 2015):

- classifiers: ``KL(softmax(t/T) ‖ softmax(s/T)) · T²``; the ``T²`` keeps the gradient scale independent of
  the temperature (the soft targets' gradients shrink as ``1/T²``).
- encoders without a head (embeddings ``[B, D]``): ``mse`` or ``1 − cosine`` between student and teacher.

``loss = weight · distill + (1 − weight) · CE(labels)``; label ``-1`` marks an unlabelled image (ignored by the
cross-entropy). Self-supervised encoders have no labels: they train with ``weight = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

UNLABELLED = -1


class NoLabelsError(ValueError):
    """A label loss was asked for, but the data has no labels."""


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher/T) ‖ softmax(student/T)) · T²``, mean over the batch.

    Args:
        student: logits ``[B, classes]`` (with grad).
        teacher: logits ``[B, classes]`` (no grad needed).
        temperature: ``T > 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor,
                         kind: Literal["mse", "cosine"] = "mse") -> torch.Tensor:
    """Distance of embeddings ``[B, D]``: mean squared error, or ``1 − cosine`` averaged over rows."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "differ")
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"feature loss {kind!r}; use 'mse' or 'cosine'")


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows (label -1 is ignored); 0 for a batch without any labelled row, so
    a mixed dataset's unlabelled batch adds only distillation."""
    labels = labels.to(logits.device).long()
    if not bool((labels != UNLABELLED).any()):
        return logits.sum() * 0.0     # keeps the graph (and FSDP's backward hooks) intact
    return F.cross_entropy(logits.float(), labels, ignore_index=UNLABELLED)


@dataclass
class LossParts:
    """The combined loss and its parts (detached floats for logging)."""

    loss: torch.Tensor
    distill: float
    labels: float


def combined_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, *,
                  weight: float, temperature: float, kind: Literal["classifier", "encoder"] = "classifier",
                  feature_loss: Literal["mse", "cosine"] = "mse") -> LossParts:
    """``weight · distill + (1 − weight) · CE`` for one batch.

    Args:
        student: the student's output (logits, or embeddings for ``kind="encoder"``).
        teacher: the dense model's output on the same batch (needed when ``weight > 0``).
        labels: class indices ``[B]`` with -1 for unlabelled rows, or None (needed when ``weight < 1``).
        weight: share of distillation in ``[0, 1]``.

    Raises:
        NoLabelsError: ``weight < 1`` but no labels were given, or an encoder (whose outputs are not logits).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distill.weight={weight} is outside [0, 1]")
    total = student.new_zeros((), dtype=torch.float32)
    distill = ce = 0.0
    if weight > 0:
        if teacher is None:
            raise ValueError(f"distill.weight={weight} needs the teacher's outputs")
        d = (logit_distillation(student, teacher, temperature) if kind == "classifier"
             else feature_distillation(student, teacher, feature_loss))
        total = total + weight * d
        distill = float(d.detach())
    if weight < 1:
        if kind == "encoder":
            raise NoLabelsError(f"distill.weight={weight} < 1 asks for a label loss, but an encoder without a head "
                                "has no logits; use finetune.distill.weight=1")
        if labels is None:
            raise NoLabelsError(f"distill.weight={weight} < 1 asks for a label loss, but the training data has no "
                                "labels; use finetune.distill.weight=1 for label-free data")
        c = label_loss(student, labels)
        total = total + (1.0 - weight) * c
        ce = float(c.detach())
    return LossParts(total, distill, ce)
