"""Reading a source: detect its form, decode it (or load the cache), resolve ``auto``
normalization statistics."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from bitvit.data.base import (
    CACHE_VERSION,
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    ImageSet,
    Stats,
)
from bitvit.data.cache import _load_cache, _load_stats, _save_cache, _save_stats
from bitvit.data.cifar import _binary_classes, _python_classes, _read_binary, _read_python
from bitvit.data.folder import FORMAT_NAMES, _list_split, _read_folder, open_image, pil_quiet
from bitvit.data.normalization import channel_statistics
from bitvit.data.subsets import balanced_subset
from bitvit.data.tree import _open_source, _parent, _read_tar, _Tree
from bitvit.files import caught_warnings, resolve_cache_dir

log = logging.getLogger("bitvit.data")


def read_images(path: Path, image_size: int, channels: int,
                cache_dir: str | os.PathLike[str] | None = None, *,
                limit_train: int | None = None, limit_test: int | None = None,
                seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Decode ``path`` (any supported form) into (train, test) uint8 sets, using the cache.

    The full decode is cached. With limits and no full cache, an image folder decodes only the
    chosen images (not cached: that takes seconds); the result equals ``balanced_subset`` of the
    full set with the same seed.
    """
    train, test, _ = _read_source(Path(path), image_size, channels, cache_dir,
                                  (limit_train, limit_test), seed, statistics=False)
    return train, test


def _read_source(path: Path, image_size: int, channels: int,
                 cache_dir: str | os.PathLike[str] | None, limits: tuple[int | None, int | None],
                 seed: int, statistics: bool) -> tuple[ImageSet, ImageSet, Stats | None]:
    """`read_images`, plus with ``statistics`` the source's normalization (`resolve_statistics`)
    from the cache, or resolved and cached beside the decoded arrays."""
    if channels not in (1, 3):
        raise DataError(f"model.in_channels={channels}: images are read with 1 (grayscale) or "
                        f"3 (RGB) channels; expected 1 or 3")
    if not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if not path.exists():
        raise DataError(f"data path {path} does not exist")

    tree, source_key = _open_source(path)
    key = hashlib.sha256(
        f"v{CACHE_VERSION}|{source_key}|{image_size}|{channels}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name) or "data"
    cache_file = resolve_cache_dir(cache_dir) / f"{stem}-{image_size}px-{channels}c-{key[:24]}.npz"
    stats_file = cache_file.with_suffix(".stats.json")

    stats = _load_stats(stats_file, key, channels) if statistics else None
    cached = _load_cache(cache_file, key)
    form = None
    # Only CIFAR-10's classes with an RGB model may take the published values; checking that
    # needs the source's tree, which a cache hit on an archive otherwise never reads.
    check_cifar = (statistics and stats is None and channels == 3
                   and (cached is None or tuple(cached[0].classes) == CIFAR10_CLASSES))
    if cached is None or check_cifar:
        if tree is None:
            tree = _read_tar(path)
        form = _detect_form(tree, path)
        if check_cifar and is_cifar10(tree, form):
            stats = _save_stats(stats_file, key, (CIFAR10_MEAN, CIFAR10_STD),
                                "CIFAR-10's published values")
    if cached is None:
        assert tree is not None and form is not None
        if form[0] == "folder" and any(limits) and not (statistics and stats is None):
            # Decode only the chosen subset; cheap enough not to cache.
            train, test = _read_folder(tree, form[1], image_size, channels, limits=limits,
                                       seed=seed)
            return train, test, stats
        train, test = _decode(tree, form, image_size, channels)
        _save_cache(cache_file, key, train, test)
    else:
        train, test = cached
        log.info("loaded %s from cache %s", path, cache_file)
    if statistics and stats is None:
        stats = _save_stats(stats_file, key, channel_statistics(train.images),
                            f"computed from the {len(train)} training images")
    if limits[0]:
        train = balanced_subset(train, limits[0], seed)
    if limits[1]:
        test = balanced_subset(test, limits[1], seed)
    return train, test, stats


def is_cifar10(tree: _Tree, form: tuple[str, str]) -> bool:
    """Whether a source is CIFAR-10, so that ``auto`` normalization takes its published values.

    The official python or binary version with CIFAR-10's ten class names in official order, or
    an image folder whose class folders are exactly those ten and whose first training image of
    every class is 32x32 RGB (an image folder's classes are sorted, as the official order is).
    """
    kind, root = form
    if kind == "python":
        return tuple(_python_classes(tree, root)) == CIFAR10_CLASSES
    if kind == "binary":
        return tuple(_binary_classes(tree, root)) == CIFAR10_CLASSES
    classes, entries = _list_split(tree, root, "train")
    if tuple(classes) != CIFAR10_CLASSES:
        return False
    first: dict[int, str] = {}
    for rel, label in entries:
        first.setdefault(label, rel)
    for rel in first.values():
        try:
            # Reads the header only; PIL's warnings and logs (a huge image) are the decoder's
            # to tell.
            with caught_warnings(), pil_quiet(), open_image(tree.files[rel]()) as img:
                if img.size != (32, 32) or img.mode != "RGB":
                    return False
        except UnidentifiedImageError:
            raise DataError(f"{tree.where(rel)}: not a readable image (not a "
                            f"{FORMAT_NAMES} image that PIL can open)") from None
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{tree.where(rel)}: not a readable image ({e})") from None
    return True


def _detect_form(tree: _Tree, path: Path) -> tuple[str, str]:
    """("python" | "binary" | "folder", root folder inside the tree)."""
    for rel in sorted(tree.files, key=len):
        base = PurePosixPath(rel)
        if base.name == "data_batch_1":
            return "python", _parent(rel)
        if base.name == "data_batch_1.bin":
            return "binary", _parent(rel)
    tops = sorted(d for d in tree.dirs if "/" not in d and not d.startswith("."))
    for root in ["", *(tops if len(tops) == 1 else [])]:
        pre = f"{root}/" if root else ""
        if f"{pre}train" in tree.dirs and f"{pre}test" in tree.dirs:
            return "folder", root
    raise DataError(f"{path}: no CIFAR-10 batches and no train/<class>/ + test/<class>/ "
                    "folders (optionally under one top-level folder) found")


def _decode(tree: _Tree, form: tuple[str, str], image_size: int,
            channels: int) -> tuple[ImageSet, ImageSet]:
    kind, root = form
    if kind == "python":
        return _read_python(tree, root, image_size, channels)
    if kind == "binary":
        return _read_binary(tree, root, image_size, channels)
    return _read_folder(tree, root, image_size, channels)
