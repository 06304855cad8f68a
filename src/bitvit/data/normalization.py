"""Per-channel normalization: statistics of a training split, their checks, and applying them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

from bitvit.data.base import DataError, Stats, _is_auto

log = logging.getLogger("bitvit.data")


def channel_statistics(images: torch.Tensor) -> Stats:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images on [0, 1].

    Sums of pixels and of their squares are exact int64, then float64; chunked, so a large set
    never needs a float copy of itself. A constant channel gets std 1 (it cannot be scaled).
    """
    x = images.numpy() if images.device.type == "cpu" else images.cpu().numpy()
    n = x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        raise DataError("no training images to compute data.mean/data.std from")
    total = np.zeros(x.shape[1], dtype=np.int64)
    squares = np.zeros(x.shape[1], dtype=np.int64)
    for start in range(0, x.shape[0], 1024):
        chunk = x[start:start + 1024].astype(np.int64)
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk * chunk).sum(axis=(0, 2, 3))
    mean = total.astype(np.float64) / n / 255.0
    var = np.maximum(squares.astype(np.float64) / n / 255.0**2 - mean**2, 0.0)
    std = np.sqrt(var)
    if (std == 0).any():
        log.warning("a channel of the training images is constant; its data.std is set to 1")
        std[std == 0] = 1.0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_normalization(mean: Iterable[float] | str, std: Iterable[float] | str,
                        channels: int) -> None:
    """Each of mean/std is auto, or one finite entry per channel (std's positive)."""
    for name, values in (("data.mean", mean), ("data.std", std)):
        if _is_auto(values):
            continue
        values = tuple(values)
        if len(values) != channels:
            raise DataError(f"{name} has {len(values)} entries but the model has {channels} "
                            f"channel(s); give one per channel, or auto")
        if not all(np.isfinite(values)) or (name == "data.std" and any(v <= 0 for v in values)):
            raise DataError(f"{name} entries must be finite"
                            f"{' and positive' if name == 'data.std' else ''}, got {list(values)}")


def normalize(images: torch.Tensor, mean: Iterable[float] | str,
              std: Iterable[float] | str) -> torch.Tensor:
    """uint8 (N, C, H, W) or (C, H, W) on any device -> float32 ``(x/255 - mean) / std``."""
    if images.dtype != torch.uint8:
        raise DataError(f"normalize expects uint8 images, got {images.dtype}")
    if _is_auto(mean) or _is_auto(std):
        raise DataError("normalize needs numbers, not auto: load_data resolves data.mean and "
                        "data.std (DataSplits.mean, .std)")
    mean, std = tuple(mean), tuple(std)
    check_normalization(mean, std, images.shape[-3])
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s
