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
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bitvit.rundir import atomic_file

log = logging.getLogger("bitvit.data")

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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_data(cfg: DataConfig, image_size: int = 32, channels: int = 3) -> DataSplits:
    """Find (or download), decode or load from cache, subset and split the data per ``cfg``.

    Order: limit_train/limit_test subsets are taken first (so a limited run decodes only what it
    uses), then ``val_size`` images are carved from the (possibly limited) training set.
    ``mean``/``std`` of the result are ``cfg``'s with ``auto`` resolved from the full training
    split of the source (before any subset), computed once and cached.
    """
    # The keys' ranges are checked when the config loads (bitvit.config); what remains here
    # depends on the arguments (channels) or on the data (val_size against its size).
    check_normalization(cfg.mean, cfg.std, channels)

    if cfg.path is None and cfg.download:
        path = download_cifar10(cfg.cache_dir, cfg.download_url, cfg.download_md5)
    else:
        path = find_data(cfg.path)
    auto = _is_auto(cfg.mean) or _is_auto(cfg.std)
    train, test, stats = _read_source(path, image_size, channels, cfg.cache_dir,
                                      (cfg.limit_train, cfg.limit_test), cfg.seed, auto)
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


def find_data(path: str | None) -> Path:
    """Resolve the data location: ``path``, then $BITVIT_DATA, then the shared default."""
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"data path {path} does not exist (from --data / data.path)")
        return p
    env = os.environ.get("BITVIT_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise DataError(f"BITVIT_DATA={env} does not exist")
        return p
    if DEFAULT_DATA.exists():
        return DEFAULT_DATA
    raise DataError("no data found: pass --data PATH (CIFAR-10 tarball or folder, or an image "
                    "folder with train/ and test/), set BITVIT_DATA, or pass --download")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, then $BITVIT_CACHE, then ~/.cache/bitvit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BITVIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitvit"


def download_cifar10(cache_dir: str | os.PathLike[str] | None, url: str | None = None,
                     md5: str | None = None) -> Path:
    """Fetch the CIFAR-10 python tarball into ``cache_dir`` and return its path.

    The file is streamed to a temp file and renamed into place only after its MD5 matches, so a
    truncated or tampered download is never used. An existing file with the right MD5 is reused.
    """
    url = url or os.environ.get("BITVIT_CIFAR10_URL") or OFFICIAL_URL
    md5 = (md5 or os.environ.get("BITVIT_CIFAR10_MD5") or OFFICIAL_MD5).lower()
    folder = resolve_cache_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "cifar-10-python.tar.gz"
    if dest.exists():
        if _file_digest(dest, "md5") == md5:
            log.info("using downloaded %s (MD5 ok)", dest)
            return dest
        log.warning("%s has the wrong MD5; downloading it again", dest)

    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        got = 0
        log.info("downloading %s", url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            expected = resp.headers.get("Content-Length")
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
        if expected is not None and got != int(expected):
            raise DataError(f"download of {url} truncated: got {got} of {expected} bytes")
        if h.hexdigest() != md5:
            raise DataError(f"download of {url} has MD5 {h.hexdigest()}, expected {md5}; "
                            "not using it")
        os.replace(tmp, dest)
    except http.client.IncompleteRead as e:
        raise DataError(f"download of {url} truncated: got {got + len(e.partial)} bytes, "
                        f"expected {e.expected} more") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"could not download {url}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


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
        raise DataError(f"channels must be 1 or 3, got {channels}")
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
            with Image.open(io.BytesIO(tree.files[rel]())) as img:  # reads the header only
                if img.size != (32, 32) or img.mode != "RGB":
                    return False
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{tree.where(rel)}: not a readable image ({e})") from None
    return True


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


def augment(images: torch.Tensor, cfg: DataConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding and/or horizontal flip, per image, on the tensor's device.

    Works on uint8 (before ``normalize``), so padding is black as in the usual CIFAR recipe.
    Returns ``images`` itself when both options are off. Random numbers are drawn on the
    generator's device (CPU by default) so results do not depend on the training device.
    """
    if not (cfg.random_crop or cfg.horizontal_flip):
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
    return s.subset(torch.from_numpy(np.flatnonzero(keep))), s.subset(torch.from_numpy(val_idx))


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Sources: a directory or a tar archive, seen as a tree of files
# --------------------------------------------------------------------------------------------


@dataclass
class _Tree:
    """Files of a source, by POSIX relative path, plus its directories (to spot empty ones)."""

    label: str  # the source, for error messages
    files: dict[str, Callable[[], bytes]]
    dirs: set[str]
    archive: bool = False

    def where(self, rel: str) -> str:
        """How to name a member in messages: archive.tar.gz:member or folder/file."""
        return f"{self.label}:{rel}" if self.archive else str(Path(self.label) / rel)


def _open_source(path: Path) -> tuple[_Tree | None, str]:
    """Cache key of the source, and its tree for directories (archives are read lazily)."""
    if path.is_dir():
        files: dict[str, Callable[[], bytes]] = {}
        dirs: set[str] = set()
        h = hashlib.sha256()
        for root, dnames, fnames in os.walk(path):
            dnames.sort()
            rel_root = Path(root).relative_to(path).as_posix()
            if rel_root != ".":
                dirs.add(rel_root)
            for f in sorted(fnames):
                full = Path(root) / f
                rel = f if rel_root == "." else f"{rel_root}/{f}"
                st = full.stat()
                # Paths, sizes and mtimes: any edit, addition or removal changes the key.
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                files[rel] = full.read_bytes
        return _Tree(str(path), files, dirs), "dir:" + h.hexdigest()
    if path.is_file():
        return None, "file:" + _file_digest(path, "sha256")
    raise DataError(f"data path {path} is neither a file nor a directory")


def _read_tar(path: Path) -> _Tree:
    """Read an archive in one streaming pass, keeping only the bytes of files we may need."""
    files: dict[str, Callable[[], bytes]] = {}
    dirs: set[str] = set()
    wanted = set(PY_FILES) | set(BIN_FILES)
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                name = PurePosixPath(m.name.lstrip("/"))
                parts = [p for p in name.parts if p not in (".", "")]
                if not parts or ".." in parts:
                    continue  # never happens in real data sets; ignore, we never extract
                rel = "/".join(parts)
                if m.isdir():
                    dirs.add(rel)
                    continue
                if not m.isfile():
                    continue
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                keep = parts[-1] in wanted or PurePosixPath(rel).suffix.lower() in IMAGE_EXTS
                data = tar.extractfile(m).read() if keep else b""  # type: ignore[union-attr]
                files[rel] = (lambda b=data: b)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a readable tar archive (or is truncated): {e}") from None
    return _Tree(str(path), files, dirs, archive=True)


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


def _parent(rel: str) -> str:
    p = PurePosixPath(rel).parent.as_posix()
    return "" if p == "." else p


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _decode(tree: _Tree, form: tuple[str, str], image_size: int,
            channels: int) -> tuple[ImageSet, ImageSet]:
    kind, root = form
    if kind == "python":
        return _read_python(tree, root, image_size, channels)
    if kind == "binary":
        return _read_binary(tree, root, image_size, channels)
    return _read_folder(tree, root, image_size, channels)


def _need(tree: _Tree, root: str, name: str) -> bytes:
    rel = _join(root, name)
    if rel not in tree.files:
        raise DataError(f"{tree.where(rel)} is missing (a CIFAR-10 folder needs "
                        f"{', '.join(BIN_FILES if name.endswith(('.bin', '.txt')) else PY_FILES)})")
    return tree.files[rel]()


# --------------------------------------------------------------------------------------------
# Official python version, with a restricted unpickler
# --------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _numpy_scalar() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to merely malformed pickle data)."""


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); allow only that.
    if not isinstance(obj, str) or encoding.lower().replace("-", "") != "latin1":
        raise _Refused(f"refusing _codecs.encode except for latin1 text, not {encoding!r}")
    return obj.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches hold: numpy arrays, dtypes, scalars, and builtins.

    Lists, dicts, bytes and str need no globals; everything else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _numpy_reconstruct()
            if name == "scalar":
                return _numpy_scalar()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise _Refused(f"refusing to unpickle global {module}.{name}")


def safe_unpickle(data: bytes, where: str = "<bytes>") -> Any:
    """Unpickle CIFAR-10 python batches safely; anything else is a one-line DataError."""
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{where}: {e} (CIFAR-10 python batches hold only numpy arrays, "
                        "lists, dicts and bytes)") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is bad input
        raise DataError(f"{where}: not a valid CIFAR-10 python batch "
                        f"({type(e).__name__}: {e})") from None


def _key(d: dict[Any, Any], name: str, where: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"{where}: missing key {name!r} (expected keys data, labels)")


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _python_classes(tree: _Tree, root: str) -> list[str]:
    meta_where = tree.where(_join(root, "batches.meta"))
    meta = safe_unpickle(_need(tree, root, "batches.meta"), meta_where)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_where}: expected a dict with label_names")
    return [_text(c) for c in _key(meta, "label_names", meta_where)]


def _read_python(tree: _Tree, root: str, image_size: int,
                 channels: int) -> tuple[ImageSet, ImageSet]:
    classes = _python_classes(tree, root)

    def batches(names: Iterable[str]) -> ImageSet:
        arrays, labels = [], []
        for name in names:
            where = tree.where(_join(root, name))
            d = safe_unpickle(_need(tree, root, name), where)
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a dict with data and labels")
            data, lab = _key(d, "data", where), _key(d, "labels", where)
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
                    and data.ndim == 2 and data.shape[1] == 3072):
                raise DataError(f"{where}: key data must be a uint8 array of shape (N, 3072), "
                                f"got {getattr(data, 'dtype', type(data).__name__)} "
                                f"{getattr(data, 'shape', '')}")
            lab = np.asarray(lab, dtype=np.int64)
            if lab.shape != (data.shape[0],):
                raise DataError(f"{where}: key labels has {lab.size} entries for "
                                f"{data.shape[0]} images")
            arrays.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab)
        return _official_set(np.concatenate(arrays), np.concatenate(labels), classes,
                             image_size, channels, tree.where(root or "."))

    return batches(PY_TRAIN), batches(["test_batch"])


# --------------------------------------------------------------------------------------------
# Official binary version
# --------------------------------------------------------------------------------------------


def _binary_classes(tree: _Tree, root: str) -> list[str]:
    meta = _need(tree, root, "batches.meta.txt").decode("utf-8", "replace")
    return [line.strip() for line in meta.splitlines() if line.strip()]


def _read_binary(tree: _Tree, root: str, image_size: int,
                 channels: int) -> tuple[ImageSet, ImageSet]:
    classes = _binary_classes(tree, root)

    def batches(names: Iterable[str]) -> ImageSet:
        recs = []
        for name in names:
            raw = _need(tree, root, name)
            if len(raw) == 0 or len(raw) % CIFAR_RECORD:
                raise DataError(f"{tree.where(_join(root, name))}: size {len(raw)} is not a "
                                f"positive multiple of {CIFAR_RECORD} (1 label + 3072 pixels)")
            recs.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD))
        r = np.concatenate(recs)
        return _official_set(r[:, 1:].reshape(-1, 3, 32, 32), r[:, 0].astype(np.int64),
                             classes, image_size, channels, tree.where(root or "."))

    return batches(f"{n}.bin" for n in PY_TRAIN), batches(["test_batch.bin"])


def _official_set(images: np.ndarray, labels: np.ndarray, classes: list[str], image_size: int,
                  channels: int, where: str) -> ImageSet:
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{where}: labels must be in 0..{len(classes) - 1} "
                        f"({len(classes)} class names), got {labels.min()}..{labels.max()}")
    if image_size != 32 or channels != 3:
        # Same PIL path as image folders, so every form gives the same pixels.
        images = np.stack([fit_image(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))),
                                image_size, channels) for im in images])
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)),
                    torch.from_numpy(labels.astype(np.int64)), classes)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def fit_image(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 (C, image_size, image_size): convert mode, then bilinear resize."""
    if img.mode.startswith("I;16"):  # 16-bit grayscale PNG: keep the high byte
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's advised route for palette images with transparency
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (image_size, image_size):
        # Square resize (no crop): predictable for any data set; CIFAR is already square.
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _list_split(tree: _Tree, root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and (file, label) entries of one split, sorted."""
    base = _join(root, split)
    classes = sorted(d.rsplit("/", 1)[1] for d in tree.dirs
                     if _parent(d) == base and not d.rsplit("/", 1)[1].startswith("."))
    if not classes:
        raise DataError(f"{tree.where(base)}: no class folders; expected {split}/<class>/*.png "
                        "or *.jpg")
    index = {c: i for i, c in enumerate(classes)}
    per_class: dict[str, list[str]] = {c: [] for c in classes}
    skipped = []
    for rel in tree.files:
        if not rel.startswith(base + "/"):
            continue
        parts = rel[len(base) + 1:].split("/")
        name = parts[-1]
        if (len(parts) == 2 and parts[0] in index and not name.startswith(".")
                and PurePosixPath(name).suffix.lower() in IMAGE_EXTS):
            per_class[parts[0]].append(rel)
            continue
        skipped.append(rel)
    if skipped:
        log.warning("skipped %d non-image file(s) in %s, e.g. %s", len(skipped),
                    tree.where(base), tree.where(skipped[0]))
    for c, files in per_class.items():
        if not files:
            raise DataError(f"{tree.where(_join(base, c))}: empty class folder (no PNG/JPEG "
                            "images); remove it or add images")
    entries = [(rel, index[c]) for c in classes for rel in sorted(per_class[c])]
    return classes, entries


def _read_folder(tree: _Tree, root: str, image_size: int, channels: int,
                 limits: tuple[int | None, int | None] = (None, None),
                 seed: int = 0) -> tuple[ImageSet, ImageSet]:
    classes, train = _list_split(tree, root, "train")
    test_classes, test = _list_split(tree, root, "test")
    if test_classes != classes:
        raise DataError(f"{tree.where(_join(root, 'test'))}: class folders {test_classes} "
                        f"differ from train/ {classes}")
    out = []
    for entries, limit in ((train, limits[0]), (test, limits[1])):
        labels = np.array([lab for _, lab in entries], dtype=np.int64)
        if limit and limit < len(entries):
            idx = _balanced_indices(labels, limit, seed)
            entries, labels = [entries[i] for i in idx], labels[idx]
        images = np.stack([_decode_image(tree, rel, image_size, channels) for rel, _ in entries])
        out.append(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(classes)))
    return out[0], out[1]


def _decode_image(tree: _Tree, rel: str, image_size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(tree.files[rel]())) as img:
            img.load()
            return fit_image(img, image_size, channels)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as e:
        raise DataError(f"{tree.where(rel)}: not a readable image ({e})") from None


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
                sets.append(ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                                     list(classes)))
        return sets[0], sets[1]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
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
        d = json.loads(file.read_text())
        mean, std = tuple(map(float, d["mean"])), tuple(map(float, d["std"]))
        if d["key"] != key or len(mean) != channels or len(std) != channels:
            raise ValueError("key or channel mismatch")
        check_normalization(mean, std, channels)
        return mean, std
    except (OSError, ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
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
