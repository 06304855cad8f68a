"""The official CIFAR-10 python batches (a restricted unpickler, never plain pickle) and binary
records, decoded to uint8 image sets."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bitvit.data.base import CIFAR_RECORD, PY_TRAIN, DataError, ImageSet, check_decoded_fits
from bitvit.data.folder import fit_image
from bitvit.data.tree import _join, _need, _Tree


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _NdarrayType:
    """What a pickle's ``numpy.ndarray`` stands for: an argument of `_empty_reconstruct` only.
    Called itself (``ndarray(shape, dtype)``), it would allocate any shape the file names."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("refusing a call of numpy.ndarray: numpy's pickles reconstruct an empty "
                       "array and fill it from the file")


_NDARRAY = _NdarrayType()


def _empty_reconstruct(cls: Any, shape: Any, dtype: Any) -> Any:
    """numpy's `_reconstruct` for the empty array its pickles start from (shape (0,)), which
    ``__setstate__`` then fills from the pickle's own bytes. Any other shape would allocate
    memory the file never held: a 200-byte pickle could ask for gigabytes."""
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
            and 0 in shape):
        raise _Refused(f"refusing numpy _reconstruct of shape {str(shape)[:40]}: numpy's "
                       "pickles reconstruct an empty array and fill it from the file")
    if cls is not _NDARRAY:
        raise _Refused("refusing numpy _reconstruct of anything but numpy.ndarray")
    return _numpy_reconstruct()(np.ndarray, shape, dtype)


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
                return _empty_reconstruct
            if name == "scalar":
                return _numpy_scalar()
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
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
    names = _key(meta, "label_names", meta_where)
    if not isinstance(names, (list, tuple)):
        raise DataError(f"{meta_where}: label_names must be a list of class names, got "
                        f"{type(names).__name__}")
    return [_text(c) for c in names]


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
            try:
                lab = np.asarray(lab, dtype=np.int64)
            except (ValueError, TypeError, OverflowError):
                raise DataError(f"{where}: key labels must be a list of integer class "
                                "indices") from None
            if lab.shape != (data.shape[0],):
                raise DataError(f"{where}: key labels has {lab.size} entries for "
                                f"{data.shape[0]} images")
            arrays.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab)
        return _official_set(np.concatenate(arrays), np.concatenate(labels), classes,
                             image_size, channels, tree.where(root or "."))

    return batches(PY_TRAIN), batches(["test_batch"])


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
        check_decoded_fits(len(images), image_size, channels, where)
        # Same PIL path as image folders, so every form gives the same pixels.
        images = np.stack([fit_image(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))),
                                image_size, channels) for im in images])
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)),
                    torch.from_numpy(labels.astype(np.int64)), classes)
