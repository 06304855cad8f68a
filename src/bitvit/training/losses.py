"""The training loss: one replaceable piece of the loop.

A loss is called with the model's logits and the `Batch` they came from. The batch carries the
augmented images before normalization (a teacher model normalizes them its own way) and their
positions in the training split (so per-image targets can be computed once and looked up), so a
new kind of loss (distillation, say) is a new class here and one line in `make_loss`, not a
branch in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from bitvit.training.config import Config


@dataclass
class Batch:
    images: torch.Tensor  # augmented, not yet normalized (N, C, H, W)
    labels: torch.Tensor  # (N,)
    index: torch.Tensor  # positions in the training split (N,)


class Loss(Protocol):
    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class TeacherLogits(Protocol):
    """A teacher's logits (N, classes), float32 and without gradients, for a batch's images
    (`bitvit.training.distill` computes them per batch or looks them up)."""

    def __call__(self, batch: Batch) -> torch.Tensor: ...


@dataclass
class CrossEntropy:
    """Cross-entropy on the labels, with optional label smoothing."""

    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)


@dataclass
class SoftDistillation:
    """Hinton et al. (2015): ``(1 - alpha) * CE(student, labels) + alpha * T^2 *
    KL(softmax(teacher / T) || softmax(student / T))``. The T^2 keeps the soft term's gradients
    on the scale of the hard term's whatever the temperature. At ``alpha = 0`` the loss and its
    gradients are bit for bit `CrossEntropy`'s (1 * x and x + 0 are exact)."""

    teacher: TeacherLogits
    alpha: float = 0.5
    temperature: float = 4.0
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        student = logits.float()
        ce = F.cross_entropy(student, batch.labels, label_smoothing=self.label_smoothing)
        t = self.temperature
        teacher = F.log_softmax(self.teacher(batch) / t, dim=1)
        kl = F.kl_div(F.log_softmax(student / t, dim=1), teacher, reduction="batchmean",
                      log_target=True)
        return (1 - self.alpha) * ce + self.alpha * t * t * kl


@dataclass
class HardDistillation:
    """DeiT's hard-label distillation (Touvron et al., 2021): ``(1 - alpha) * CE(student,
    labels) + alpha * CE(student, argmax teacher)``; at the default ``alpha = 0.5`` that is
    DeiT's ``(CE(student, labels) + CE(student, argmax teacher)) / 2``. Label smoothing applies to
    the labels' term only."""

    teacher: TeacherLogits
    alpha: float = 0.5
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        student = logits.float()
        ce = F.cross_entropy(student, batch.labels, label_smoothing=self.label_smoothing)
        teacher_ce = F.cross_entropy(student, self.teacher(batch).argmax(dim=1))
        return (1 - self.alpha) * ce + self.alpha * teacher_ce


def make_loss(config: Config, teacher: TeacherLogits | None = None) -> Loss:
    """The loss ``config`` asks for: cross-entropy, or distillation from ``teacher`` when
    ``train.distill.teacher`` is set (`bitvit.training.distill.set_up` gives the logits)."""
    smoothing, distill = config.train.label_smoothing, config.train.distill
    if distill.teacher is None:
        return CrossEntropy(smoothing)
    if teacher is None:
        raise ValueError("train.distill.teacher is set: make_loss needs the teacher's logits")
    if distill.kind == "hard":
        return HardDistillation(teacher, distill.alpha, smoothing)
    return SoftDistillation(teacher, distill.alpha, distill.temperature, smoothing)
