"""Placeholder until the data branch lands: the DataConfig contract only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    path: str | None = None
    download: bool = False
    download_url: str | None = None
    download_md5: str | None = None
    cache_dir: str | None = None
    val_size: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    random_crop: bool = False
    crop_padding: int = 4
    horizontal_flip: bool = False
