"""The decoded-array cache (a safe ``.npz``) and the normalization statistics cache (JSON),
both written atomically; an unreadable cache is a logged miss, never an error."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from bitvit.data.base import ImageSet, Stats
from bitvit.data.normalization import check_normalization
from bitvit.files import atomic_file, parse_json, read_limited

log = logging.getLogger("bitvit.data")


def _load_cache(file: Path, key: str) -> tuple[ImageSet, ImageSet] | None:
    """The cached sets, or None on a miss; a corrupt or mismatched cache is a logged miss."""
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) != key:
                raise ValueError("key mismatch")
            classes = [str(c) for c in z["classes"]]
            sets = []
            for split in ("train", "test"):
                images, labels = z[f"{split}_images"], z[f"{split}_labels"]
                if (images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64
                        or labels.shape != (images.shape[0],)):
                    raise ValueError(f"bad {split} arrays")
                if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
                    raise ValueError(f"{split} labels outside 0..{len(classes) - 1}")
                sets.append(ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                                     list(classes)))
        return sets[0], sets[1]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile,
            zlib.error) as e:  # TypeError: a bare .npy in its place, a 0-d class list
        log.warning("cache %s unreadable (%s); rebuilding it", file, e)
        return None


def _save_cache(file: Path, key: str, train: ImageSet, test: ImageSet) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written cache."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, key=np.array(key), classes=np.array(train.classes, dtype=str),
                         train_images=train.images.numpy(), train_labels=train.labels.numpy(),
                         test_images=test.images.numpy(), test_labels=test.labels.numpy())

        atomic_file(file, write)
        log.info("cached decoded data in %s", file)
    except OSError as e:  # a read-only cache folder should not stop training
        log.warning("could not write cache %s: %s", file, e)


def _load_stats(file: Path, key: str, channels: int) -> Stats | None:
    """Cached normalization statistics, or None on a miss (a bad file is a logged miss)."""
    if not file.exists():
        return None
    try:
        d = parse_json(read_limited(file, "statistics cache"))  # nesting bounded
        mean, std = tuple(map(float, d["mean"])), tuple(map(float, d["std"]))
        if d["key"] != key or len(mean) != channels or len(std) != channels:
            raise ValueError("key or channel mismatch")
        check_normalization(mean, std, channels)
        return mean, std
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:  # DataError too
        log.warning("statistics cache %s unreadable (%s); computing them again", file, e)
        return None


def _save_stats(file: Path, key: str, stats: Stats, how: str) -> Stats:
    """Write atomically like the decoded cache; an unwritable cache only costs a recompute."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".cache-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "mean": list(stats[0]), "std": list(stats[1]),
                           "how": how}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("normalization statistics (%s) cached in %s", how, file)
    except OSError as e:
        log.warning("could not write statistics cache %s: %s", file, e)
    return stats
