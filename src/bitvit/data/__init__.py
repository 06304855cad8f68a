"""Data layer: every form of CIFAR-10 and any image folder, decoded once, cached, held as uint8.

Supported sources (a directory or a tar archive, optionally gzipped):

* the official CIFAR-10 python version (``cifar-10-batches-py`` / ``cifar-10-python.tar.gz``),
  parsed with a restricted unpickler, never plain pickle;
* the official binary version (``cifar-10-batches-bin`` / ``cifar-10-binary.tar.gz``);
* an image folder ``train/<class>/*`` + ``test/<class>/*`` (optionally under one top-level
  folder), PNG or JPEG, any number of classes, grayscale or RGB.

Everything is decoded to uint8 ``(N, C, H, W)`` tensors once and cached in a safe ``.npz``
(loaded with ``allow_pickle=False``) keyed by the source and by ``image_size``/``channels``.
Normalization and augmentation run later on tensors, on the training device.

Normalization statistics ``auto`` (the default) resolve to CIFAR-10's published values when the
source is CIFAR-10 (see `is_cifar10`) and the model is RGB, else to the per-channel mean and std
of the full training split; they are cached beside the decoded arrays in a small JSON file.

One job per module: ``base`` (config section, image sets, constants), ``download`` (finding or
fetching the data), ``tree`` (a folder or archive as files), ``cifar`` and ``folder`` (the
readers), ``sources`` (form detection, decoding, the cache and ``auto`` statistics), ``cache``,
``normalization``, ``augment``, ``subsets`` and ``load`` (`load_data`).

Layer 1, beside `bitvit.nn`. May import `bitvit.files` and `bitvit.system` only.
"""

from bitvit.data.augment import augment, augments
from bitvit.data.base import (
    AUTO,
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DEFAULT_DATA,
    IMAGE_EXTS,
    OFFICIAL_MD5,
    OFFICIAL_URL,
    DataConfig,
    DataError,
    DataSplits,
    ImageSet,
    Stats,
)
from bitvit.data.cifar import safe_unpickle
from bitvit.data.download import download_cifar10, find_data
from bitvit.data.folder import decode_image, fit_image, max_image_pixels
from bitvit.data.load import load_data
from bitvit.data.normalization import channel_statistics, check_normalization, normalize
from bitvit.data.sources import is_cifar10, read_images
from bitvit.data.subsets import _balanced_indices, balanced_subset, split_validation

__all__ = [
    "AUTO", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DEFAULT_DATA", "IMAGE_EXTS",
    "OFFICIAL_MD5", "OFFICIAL_URL", "DataConfig", "DataError", "DataSplits", "ImageSet", "Stats",
    "_balanced_indices", "augment", "augments", "balanced_subset", "channel_statistics",
    "check_normalization", "decode_image", "download_cifar10", "find_data", "fit_image",
    "is_cifar10", "load_data", "max_image_pixels", "normalize", "read_images", "safe_unpickle",
    "split_validation",
]
