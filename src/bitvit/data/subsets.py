"""Class-balanced, seeded subsets and the validation split."""

from __future__ import annotations

import numpy as np
import torch

from bitvit.data.base import DataError, ImageSet


def balanced_subset(s: ImageSet, n: int, seed: int) -> ImageSet:
    """A class-balanced, seeded subset of ``n`` images (all of ``s`` if n >= len(s))."""
    if not isinstance(n, int) or n <= 0:
        raise DataError(f"subset size must be a positive integer, got {n!r}")
    if n >= len(s):
        return s
    return s.subset(torch.from_numpy(_balanced_indices(s.labels.numpy(), n, seed)))


def split_validation(s: ImageSet, n: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Carve a class-balanced, seeded validation set of ``n`` images; returns (train, val)."""
    if not 0 < n < len(s):
        raise DataError(f"data.val_size={n} must be between 1 and {len(s) - 1}")
    # A different random stream than the subsets, so val is not just "the first picks".
    val_idx = _balanced_indices(s.labels.numpy(), n, seed, stream=1)
    keep = np.ones(len(s), dtype=bool)
    keep[val_idx] = False
    # Round-robin takes a small class whole once n reaches its share: it would not be trained.
    emptied = sorted(set(s.labels.tolist()) - set(s.labels[torch.from_numpy(keep)].tolist()))
    if emptied:
        names = ", ".join(s.classes[c] for c in emptied[:3]) + (", ..." if len(emptied) > 3
                                                              else "")
        raise DataError(f"data.val_size={n} takes every training image of {len(emptied)} "
                        f"class(es) ({names}); make data.val_size smaller or give more images")
    return s.subset(torch.from_numpy(np.flatnonzero(keep))), s.subset(torch.from_numpy(val_idx))


def _balanced_indices(labels: np.ndarray, n: int, seed: int, stream: int = 0) -> np.ndarray:
    """Sorted indices of n items taken round-robin over classes from seeded per-class shuffles.

    Round-robin keeps the subset balanced (class counts differ by at most one) and still
    fills ``n`` when some class runs out.
    """
    rng = np.random.default_rng([seed, stream])
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx[rng.permutation(len(idx))]] = np.arange(len(idx))
    order = np.lexsort((labels, rank))  # by rank, then class
    return np.sort(order[:n])
