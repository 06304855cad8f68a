"""The data layer's vocabulary: the ``data:`` config section, image sets, constants, errors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
DEFAULT_DATA = Path("../shared/data/cifar-10-jpeg.tar.gz")  # relative to the project root (cwd)
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PY_FILES = (*PY_TRAIN, "test_batch", "batches.meta")
BIN_FILES = (*(f"{n}.bin" for n in (*PY_TRAIN, "test_batch")), "batches.meta.txt")
CIFAR_RECORD = 1 + 3 * 32 * 32  # binary version: one label byte, then 3072 CHW pixel bytes
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
AUTO = "auto"  # data.mean / data.std: resolve from the data (see resolve_statistics)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the published per-channel values of its training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one entry per channel
# Images above this many pixels are refused before they are decoded: a ViT sees a few hundred
# pixels a side, and PIL's own limit (89M, a warning; 179M, an error) lets a 300 MB decode
# through. BITVIT_MAX_IMAGE_PIXELS changes it.
MAX_PIXELS_ENV = "BITVIT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 16_000_000
# The most bytes bitvit reads of one file of a data set (an image, a CIFAR-10 batch), refused
# from its size before reading: 8 bytes per pixel of the pixel limit (an uncompressed 16-bit RGBA
# TIFF at the limit fits; 128 MB by default), never under 64 MiB (CIFAR-10's batches are 31 MB,
# and a small image may carry megabytes of metadata). A tar.gz bomb or /dev/zero stops there.
BYTES_PER_PIXEL = 8
MIN_FILE_BYTES = 64 << 20
# The formats PIL may open (by content, not name): Image.open tries every plugin otherwise, and
# some (ICO, ...) decode an embedded image before bitvit sees the size.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class DataError(ValueError):
    """Bad data input. The message is always ONE line naming the file/key and what was expected."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line even when they embed OS or library errors.
        super().__init__(" ".join(str(message).split()))


@dataclass
class DataConfig:
    """The ``data:`` section of YAML configs (plain data; CLI flags map onto these fields)."""

    # File or folder to read. None -> $BITVIT_DATA, then ../shared/data/cifar-10-jpeg.tar.gz
    # (relative to the working directory) if it exists.
    path: str | None = None
    # Fetch the official python tarball into cache_dir (used only when path is None).
    download: bool = False
    # Download address; None -> $BITVIT_CIFAR10_URL, then the official address.
    download_url: str | None = None
    # Expected MD5 of the download; None -> $BITVIT_CIFAR10_MD5, then the official MD5.
    download_md5: str | None = None
    # Where decoded arrays and downloads are kept; None -> $BITVIT_CACHE, then ~/.cache/bitvit.
    cache_dir: str | None = None
    # Images carved from train (class-balanced, seeded) for model selection; 0 -> no val split.
    val_size: int = 0
    # Class-balanced seeded subset of the train / test set (None -> all); applied before val.
    limit_train: int | None = None
    limit_test: int | None = None
    # Seed for subsets and the validation split (independent of the training seed).
    seed: int = 0
    # Per-channel normalization on [0, 1] pixels: one number per channel, or auto (each of the
    # two on its own): CIFAR-10's published values for CIFAR-10 with an RGB model, else computed
    # from the training split. Training records the resolved numbers (config.yaml, checkpoints).
    mean: tuple[float, ...] | str = AUTO
    std: tuple[float, ...] | str = AUTO
    # Training augmentation (all off for the paper preset): random crop after zero padding of
    # crop_padding pixels per side, and random horizontal flip with probability 0.5.
    random_crop: bool = False
    crop_padding: int = 4
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples of floats so configs compare and serialize cleanly.
        self.mean = _stats_value(self.mean, "data.mean")
        self.std = _stats_value(self.std, "data.std")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx], list(self.classes))


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    classes: list[str]
    source: Path  # the data file or folder actually read (found or downloaded)
    # The normalization to use: data.mean/data.std with auto resolved (see resolve_statistics).
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def sha256(self) -> str:
        """The splits' images and labels as a run uses them (a resume on other data, or on the
        same data split otherwise, gives another)."""
        h = hashlib.sha256()
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            if split is not None:
                h.update(f"{name} {tuple(split.images.shape)}\n".encode())
                h.update(split.images.cpu().contiguous().numpy())  # no copy: the buffer
                h.update(split.labels.cpu().contiguous().numpy())
        return h.hexdigest()


def max_image_pixels() -> int:
    """The most pixels bitvit decodes in one image: $BITVIT_MAX_IMAGE_PIXELS, else 16 million."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive integer (pixels)")
    return value


def max_file_bytes() -> int:
    """The most bytes bitvit reads of one file of a data set (see `MIN_FILE_BYTES`)."""
    return max(MIN_FILE_BYTES, BYTES_PER_PIXEL * max_image_pixels())


def file_limit_hint() -> str:
    """How to raise `max_file_bytes`, for the messages that refuse a file by its size."""
    return f" ({MAX_PIXELS_ENV} raises it: {BYTES_PER_PIXEL} bytes per pixel)"


def check_decoded_fits(count: int, image_size: int, channels: int, where: str) -> None:
    """Refuse, before decoding, ``count`` images that would not fit in the memory available:
    each is decoded into an array of its own and then stacked into one, so twice their bytes
    (CIFAR-10 at 224 px is 18 GB)."""
    from bitvit import system

    need = 2 * count * channels * image_size * image_size
    if (why := system.memory_shortfall(need, "to decode")) is not None:
        raise DataError(f"{where}: {count} images at {image_size}x{image_size}x{channels} take "
                        f"{why}; make model.image_size smaller or set data.limit_train")


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == AUTO


def _rounded(values: Iterable[float]) -> list[float]:
    return [round(v, 4) for v in values]


def _stats_value(v: Any, name: str) -> tuple[float, ...] | str:
    """data.mean/data.std as given: auto, or a tuple of floats (YAML gives lists)."""
    if isinstance(v, str):
        if v == AUTO:
            return v
        raise DataError(f"{name} must be auto or a list of numbers (one per channel), got {v!r}")
    try:
        vals = (v,) if isinstance(v, (int, float)) else tuple(v)
        return tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be auto or a list of numbers (one per channel), "
                        f"got {v!r}") from None


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
