"""Training augmentation on uint8 tensors: random crop after zero padding, horizontal flip."""

from __future__ import annotations

import torch

from bitvit.data.base import DataConfig


def augments(cfg: DataConfig) -> bool:
    """Whether `augment` changes any image: otherwise every epoch sees the same images (and a
    distillation teacher's logits for them can be computed once)."""
    return (cfg.random_crop and cfg.crop_padding > 0) or cfg.horizontal_flip


def augment(images: torch.Tensor, cfg: DataConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding and/or horizontal flip, per image, on the tensor's device.

    Works on uint8 (before ``normalize``), so padding is black as in the usual CIFAR recipe.
    Returns ``images`` itself when both options are off. Random numbers are drawn on the
    generator's device (CPU by default) so results do not depend on the training device.
    """
    if not augments(cfg):
        return images
    n, _, h, w = images.shape
    dev = images.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    out = images
    if cfg.random_crop and cfg.crop_padding > 0:
        p = cfg.crop_padding
        padded = torch.nn.functional.pad(out, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(dev)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (N,1,H,1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (N,1,1,W)
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(out.shape[1], device=dev)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if cfg.horizontal_flip:
        flip = torch.rand(n, generator=generator, device=gdev).to(dev) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
