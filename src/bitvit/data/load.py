"""`load_data`: the data a config asks for, found, decoded, subset and split."""

from __future__ import annotations

import logging

from bitvit.data.base import DataConfig, DataError, DataSplits, _is_auto, _rounded
from bitvit.data.download import download_cifar10, find_data
from bitvit.data.normalization import check_normalization
from bitvit.data.sources import _read_source
from bitvit.data.subsets import split_validation

log = logging.getLogger("bitvit.data")


def load_data(cfg: DataConfig, image_size: int = 32, channels: int = 3) -> DataSplits:
    """Find (or download), decode or load from cache, subset and split the data per ``cfg``.

    Order: limit_train/limit_test subsets are taken first (so a limited run decodes only what it
    uses), then ``val_size`` images are carved from the (possibly limited) training set.
    ``mean``/``std`` of the result are ``cfg``'s with ``auto`` resolved from the full training
    split of the source (before any subset), computed once and cached.
    """
    # The keys' ranges are checked when the config loads (bitvit.training.config); what remains here
    # depends on the arguments (channels) or on the data (val_size against its size).
    check_normalization(cfg.mean, cfg.std, channels)

    if cfg.path is None and cfg.download:
        path = download_cifar10(cfg.cache_dir, cfg.download_url, cfg.download_md5)
    else:
        path = find_data(cfg.path)
    auto = _is_auto(cfg.mean) or _is_auto(cfg.std)
    train, test, stats = _read_source(path, image_size, channels, cfg.cache_dir,
                                      (cfg.limit_train, cfg.limit_test), cfg.seed, auto)
    if len(train.classes) < 2:  # one class: nothing to tell apart, every loss is zero
        raise DataError(f"{path}: {len(train.classes)} class ({', '.join(train.classes)}); "
                        "classification needs at least two (one folder per class under "
                        "train/ and test/)")
    mean = stats[0] if stats is not None and _is_auto(cfg.mean) else cfg.mean
    std = stats[1] if stats is not None and _is_auto(cfg.std) else cfg.std
    if auto:
        log.info("data.mean %s, data.std %s (auto)", _rounded(mean), _rounded(std))
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise DataError(f"data.val_size={cfg.val_size} must be smaller than the training "
                            f"set ({len(train)} images in {path})")
        train, val = split_validation(train, cfg.val_size, cfg.seed)
    log.info("data %s: train %d, val %d, test %d, %d classes", path, len(train),
             len(val) if val is not None else 0, len(test), len(train.classes))
    return DataSplits(train=train, val=val, test=test, classes=list(train.classes),
                      source=path.resolve(), mean=tuple(mean), std=tuple(std))
