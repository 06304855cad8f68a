"""A model in memory on a data set: logits, loss, accuracy, per-class accuracy, confusion.

Training calls these every epoch; `bitvit.evaluate` (in `bitvit.deploy`) loads files and calls
`evaluate_model`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitvit.data import ImageSet, normalize


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], batch_size: int = 500,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (on CPU) for uint8 images (N, C, H, W), normalized with the given mean and std."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), mean, std)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_model(model: nn.Module, data: ImageSet, mean: tuple[float, ...],
                   std: tuple[float, ...], batch_size: int = 500,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix (rows: true class) of a model
    already on ``device`` on a data set; `evaluate` takes paths and does the loading."""
    logits = predict_logits(model, data.images, mean, std, batch_size, device)
    labels = data.labels.cpu()
    pred = logits.argmax(dim=1)
    k = len(data.classes)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    # Exact fractions (a float32 mean printed 0.15000000596); a class without test images has
    # no accuracy (None), not 0.
    per_class = [right / total if total else None for right, total in zip(
        confusion.diag().tolist(), confusion.sum(dim=1).tolist(), strict=True)]
    return {
        "n": len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": int((pred == labels).sum()) / len(labels) if len(labels) else math.nan,
        "per_class_accuracy": dict(zip(data.classes, per_class, strict=True)),
        "confusion_matrix": confusion.tolist(),
    }


