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


@dataclass
class CrossEntropy:
    """Cross-entropy on the labels, with optional label smoothing."""

    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)


def make_loss(config: Config) -> Loss:
    """The loss ``config`` asks for."""
    return CrossEntropy(config.train.label_smoothing)
