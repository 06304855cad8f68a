"""How raw images become a model's inputs: the preprocessing an export records and applies."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from bitvit.data import decode_image, fit_image, normalize

if TYPE_CHECKING:
    from bitvit.training.config import Config


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_numbers(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                       for x in v)


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become model inputs: resize, then (x / 255 - mean) / std."""

    image_size: int
    channels: int  # 1 (grayscale, PIL mode L) or 3 (RGB)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # square resize, no crop (as the data loader does)

    @classmethod
    def from_config(cls, config: Config) -> Preprocessing:
        for name in ("mean", "std"):
            if isinstance(getattr(config.data, name), str):
                raise ValueError(f"config data.{name} is {getattr(config.data, name)!r}: an "
                                 "export needs the numbers the model was trained with (a "
                                 "trained run's config has them)")
        return cls(config.model.image_size, config.model.in_channels,
                   tuple(float(m) for m in config.data.mean),
                   tuple(float(s) for s in config.data.std))

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From export metadata; a ValueError naming the key for a value of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing={d!r}: expected a mapping")
        p = cls(**d)  # a TypeError names a missing or unknown key
        for key, ok, expected in (
                ("image_size", _is_int, "an integer"), ("channels", _is_int, "an integer"),
                ("mean", is_numbers, "a list of numbers"), ("std", is_numbers,
                                                              "a list of numbers"),
                ("interpolation", lambda v: isinstance(v, str), "a string")):
            if not ok(getattr(p, key)):
                raise ValueError(f"preprocessing.{key}={getattr(p, key)!r}: expected {expected}")
        return cls(p.image_size, p.channels, tuple(map(float, p.mean)),
                   tuple(map(float, p.std)), p.interpolation)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) or (C, H, W) -> normalized float32 (N, C, S, S) on their device."""
        if images.dtype != torch.uint8:
            raise ValueError(f"preprocess expects uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected uint8 images of shape (N, {self.channels}, H, W), got "
                             f"{tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = torch.stack([self._resized(image) for image in images])
        return normalize(images, self.mean, self.std)

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        """One image resized by PIL, as the data loader and `read_image` resize (torch's own
        bilinear resize differs from PIL's by a level on about a sixth of the pixels)."""
        a = image.cpu().numpy()
        pil = Image.fromarray(a[0] if self.channels == 1 else a.transpose(1, 2, 0))
        a = np.array(fit_image(pil, self.image_size, self.channels))  # writable: PIL's is not
        return torch.from_numpy(a).to(image.device)

    def read_image(self, path: str | Path) -> torch.Tensor:
        """A PNG/JPEG file -> uint8 (C, S, S), decoded exactly as the data loader decodes (and
        refused as it refuses, with a `bitvit.data.DataError`: unreadable, or over
        `bitvit.data.max_image_pixels`)."""
        a = decode_image(Path(path), str(path), self.image_size, self.channels)
        return torch.from_numpy(np.array(a))  # a writable copy (PIL arrays are read-only)
