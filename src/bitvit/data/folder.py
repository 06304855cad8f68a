"""Image folders ``train/<class>/*`` + ``test/<class>/*``: PNG or JPEG, any classes, fitted to
the model's size and channels."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bitvit.data.base import (
    IMAGE_EXTS,
    IMAGE_FORMATS,
    MAX_PIXELS_ENV,
    DataError,
    ImageSet,
    check_decoded_fits,
    file_limit_hint,
    max_file_bytes,
    max_image_pixels,
)
from bitvit.data.subsets import _balanced_indices
from bitvit.data.tree import _join, _parent, _Tree
from bitvit.files import FileRefused, caught_warnings, read_limited, warning_note

log = logging.getLogger("bitvit.data")


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


def _eight_bit(img: Image.Image, where: str) -> Image.Image:
    """A 32-bit integer image (PIL's mode I) in 8 bits: a 16-bit PPM (PIL scales any maxval
    over 255 to 0..65535) by its high byte, as 16-bit PNGs are read; other mode-I images (a
    32-bit TIFF) as they are when their values fit 8 bits. PIL's own conversion would clip
    every value over 255 to white. Float images, and other integers, have no range to scale
    from: refused in one line."""
    if img.mode not in ("I", "F"):
        return img
    a = np.asarray(img)
    low, high = (a.min(), a.max()) if a.size else (0, 0)
    if img.mode == "I" and img.format == "PPM" and low >= 0 and high <= 65535:
        return Image.fromarray((a >> 8).astype(np.uint8))
    if img.mode == "I" and low >= 0 and high <= 255:
        return Image.fromarray(a.astype(np.uint8))
    kind = "32-bit integer" if img.mode == "I" else "floating-point"
    raise DataError(f"{where}: a {kind} image with values {low:g}..{high:g}, which has no "
                    "fixed range; bitvit reads 8- and 16-bit images (convert it to one)")


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
        check_decoded_fits(len(entries), image_size, channels, tree.where(root or "."))
        images = np.stack([_decode_image(tree, rel, image_size, channels) for rel, _ in entries])
        out.append(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(classes)))
    return out[0], out[1]


def _decode_image(tree: _Tree, rel: str, image_size: int, channels: int) -> np.ndarray:
    return decode_image(tree.files[rel](), tree.where(rel), image_size, channels)


# Progressive JPEGs have about 10 scans; a crafted one has thousands within the pixel limit,
# and decoding is a pass over the image per scan (10,000 scans: 14 s for 16 MP).
MAX_JPEG_SCANS = 100
FORMAT_NAMES = ", ".join(IMAGE_FORMATS[:-1]) + " or " + IMAGE_FORMATS[-1]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def pil_quiet() -> Iterator[list[str]]:
    """Keep PIL's log records (warnings and up) off stderr in the block and collect their
    messages: some plugins log a refusal (a TIFF's samples per pixel) besides raising, which
    would print a line before bitvit's one. `pil_note` folds them into bitvit's message."""
    pil = logging.getLogger("PIL")
    handler, propagate = _Records(), pil.propagate
    pil.addHandler(handler)
    pil.propagate = False
    try:
        yield handler.messages
    finally:
        pil.removeHandler(handler)
        pil.propagate = propagate


def pil_note(messages: list[str], limit: int = 160) -> str:
    """PIL's logged messages as one clause ("; PIL: ..."), "" when there were none."""
    text = "; ".join(dict.fromkeys(" ".join(m.split()) for m in messages))
    if not text:
        return ""
    return "; PIL: " + (text if len(text) <= limit else text[:limit - 3] + "...")


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy image of ``data`` (the header read, nothing decoded), in `IMAGE_FORMATS` only.
    bitvit's pixel limit is checked by its callers; PIL's own (about 179 MP) must not cap it
    lower when $BITVIT_MAX_IMAGE_PIXELS raises it."""
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL warns past it and refuses past twice it
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _image_bytes(source: bytes | str | Path, where: str) -> bytes:
    """The bytes of an image given as bytes or as a path: a regular file within
    `max_file_bytes` (a FIFO would hang PIL's read, /dev/zero would never end)."""
    if isinstance(source, bytes):
        return source
    try:
        return read_limited(source, "PNG, JPEG or other image", max_file_bytes())
    except FileRefused as e:
        hint = file_limit_hint() if str(e).endswith(" bytes") else ""
        raise DataError(f"{e}{hint}") from None
    except OSError as e:
        raise DataError(f"{where}: not a readable image ({e.strerror or e})") from None


def decode_image(source: bytes | str | Path, where: str, image_size: int,
               channels: int) -> np.ndarray:
    """An image file (its bytes, or its path) -> uint8 (C, image_size, image_size).

    One that is not a readable image, or that has more pixels than `max_image_pixels` (judged
    from its header, before decoding), is a one-line `DataError` naming ``where``. PIL's warnings
    are folded into that line, or dropped when the image decodes: they never print their own.
    """
    limit = max_image_pixels()
    data = _image_bytes(source, where)
    with caught_warnings() as caught, pil_quiet() as logged:
        try:
            with open_image(data) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > limit:
                    raise DataError(f"{where}: {width}x{height} = {width * height:,} pixels, over "
                                    f"bitvit's limit of {limit:,} ({MAX_PIXELS_ENV} raises it); "
                                    "not decoded")
                scans = data.count(b"\xff\xda")  # JPEG start-of-scan markers
                if img.format == "JPEG" and scans > MAX_JPEG_SCANS:
                    raise DataError(f"{where}: a JPEG of {scans:,} scans; bitvit decodes at most "
                                    f"{MAX_JPEG_SCANS} (each scan is a pass over the whole "
                                    "image); not decoded")
                img.load()
                return fit_image(_eight_bit(img, where), image_size, channels)
        except DataError:
            raise
        except UnidentifiedImageError:
            # PIL's own text names a BytesIO object; say what bitvit reads instead.
            raise DataError(f"{where}: not a readable image (not a {FORMAT_NAMES} image "
                            f"that PIL can open"
                            f"{pil_note(logged)}{warning_note(caught)})") from None
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            reason = str(e) or type(e).__name__
            raise DataError(f"{where}: not a readable image ({reason}{pil_note(logged)}"
                            f"{warning_note(caught)})") from None
