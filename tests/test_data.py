"""Tests of bitvit.data: every form round-trips, cache, subsets, splits, download, bad inputs."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bitvit import data as D
from bitvit.data import (
    DataConfig,
    DataError,
    ImageSet,
    augment,
    balanced_subset,
    download_cifar10,
    find_data,
    load_data,
    normalize,
    read_images,
    safe_unpickle,
    split_validation,
)
from bitvit.data import folder as data_folder
from bitvit.data import sources as data_sources
from bitvit.training.config import Config, ConfigError, load_config

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
REAL = Path(__file__).resolve().parents[1] / "../shared/data/cifar-10-jpeg.tar.gz"
if not REAL.exists():  # worktrees live beside the main checkout
    REAL = Path("/work/shared/data/cifar-10-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's cache, data or download settings."""
    for var in ("BITVIT_DATA", "BITVIT_CIFAR10_URL", "BITVIT_CIFAR10_MD5"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------
# Writers of each form, from the same arrays
# ------------------------------------------------------------------------------------------


def make_arrays(per_class_train=5, per_class_test=2, seed=0):
    """Random CIFAR-shaped data sorted by label (the order image folders are read in)."""
    rng = np.random.default_rng(seed)
    ytr = np.repeat(np.arange(10), per_class_train)
    yte = np.repeat(np.arange(10), per_class_test)
    xtr = rng.integers(0, 256, (len(ytr), 3, 32, 32), dtype=np.uint8)
    xte = rng.integers(0, 256, (len(yte), 3, 32, 32), dtype=np.uint8)
    return xtr, ytr, xte, yte


def _pickle(obj, official_name=False) -> bytes:
    b = pickle.dumps(obj, protocol=2)
    if official_name:  # the official files were written by numpy 1.x under Python 2
        b = b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return b


def write_python(root: Path, arrays, official_name=False) -> Path:
    xtr, ytr, xte, yte = arrays
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(ytr)), 5)
    for i, idx in enumerate(chunks, 1):
        batch = {b"batch_label": b"training batch %d of 5" % i,
                 b"labels": [int(v) for v in ytr[idx]],
                 b"data": xtr[idx].reshape(len(idx), -1),
                 b"filenames": [b"img_%d.png" % j for j in idx]}
        (d / f"data_batch_{i}").write_bytes(_pickle(batch, official_name))
    (d / "test_batch").write_bytes(_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in yte],
         b"data": xte.reshape(len(yte), -1), b"filenames": []}, official_name))
    (d / "batches.meta").write_bytes(_pickle(
        {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, official_name))
    return d


def write_binary(root: Path, arrays) -> Path:
    xtr, ytr, xte, yte = arrays
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)

    def records(x, y):
        return np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(y), -1)], 1).tobytes()

    for i, idx in enumerate(np.array_split(np.arange(len(ytr)), 5), 1):
        (d / f"data_batch_{i}.bin").write_bytes(records(xtr[idx], ytr[idx]))
    (d / "test_batch.bin").write_bytes(records(xte, yte))
    (d / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return d


def write_folder(root: Path, arrays, classes=CLASSES) -> Path:
    xtr, ytr, xte, yte = arrays
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        for i, (im, lab) in enumerate(zip(x, y, strict=True)):
            p = root / split / classes[lab] / f"{i:04d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im.transpose(1, 2, 0)).save(p)
    return root


def make_tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as t:
        t.add(src, arcname=src.name)
    return dest


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------
# Forms
# ------------------------------------------------------------------------------------------


def test_all_forms_give_identical_tensors(tmp_path):
    arrays = make_arrays()
    xtr, ytr, xte, yte = arrays
    py = write_python(tmp_path / "py", arrays)
    pyo = write_python(tmp_path / "pyo", arrays, official_name=True)
    bn = write_binary(tmp_path / "bin", arrays)
    fo = write_folder(tmp_path / "folder" / "cifar-10-png", arrays)
    sources = [py, pyo, bn, fo, tmp_path / "folder",  # folder under one top-level folder
               make_tar(py, tmp_path / "cifar-10-python.tar.gz"),
               make_tar(bn, tmp_path / "cifar-10-binary.tar.gz"),
               make_tar(fo, tmp_path / "cifar-10-png.tar.gz")]
    for src in sources:
        train, test = read_images(src, 32, 3)
        assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64, src
        assert torch.equal(train.images, torch.from_numpy(xtr)), src
        assert torch.equal(train.labels, torch.from_numpy(ytr)), src
        assert torch.equal(test.images, torch.from_numpy(xte)), src
        assert torch.equal(test.labels, torch.from_numpy(yte)), src
        assert train.classes == CLASSES == test.classes, src
    # Resized grayscale goes through one code path for every form too.
    ref = read_images(py, 16, 1)
    for src in (bn, fo):
        other = read_images(src, 16, 1)
        assert other[0].images.shape == (50, 1, 16, 16)
        assert torch.equal(other[0].images, ref[0].images)
        assert torch.equal(other[1].images, ref[1].images)


def test_load_data_end_to_end(tmp_path):
    arrays = make_arrays()
    src = write_binary(tmp_path, arrays)
    s = load_data(DataConfig(path=str(src), val_size=10, limit_test=10))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10)
    assert s.classes == CLASSES
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [1] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [1] * 10


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path):
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    with pytest.raises(DataError) as e:
        safe_unpickle(pickle.dumps({b"data": Evil()}, protocol=2), "x")
    assert "refusing" in one_line(e) and "mkdir" in str(e.value)
    assert not target.exists()

    d = write_python(tmp_path / "py", make_arrays())
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError) as e:
        read_images(d, 32, 3)
    assert "data_batch_2" in one_line(e) and "refusing" in str(e.value)
    assert not target.exists()

    # eval via builtins and a non-latin1 codec are refused too.
    evil2 = b"cbuiltins\neval\n(V1+1\ntR."
    with pytest.raises(DataError, match="builtins.eval"):
        safe_unpickle(evil2)
    with pytest.raises(DataError, match="latin1"):
        safe_unpickle(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DataError, match="not a valid"):
        safe_unpickle(b"garbage")


def test_a_cifar_pickle_that_asks_for_memory_it_does_not_hold_is_refused(tmp_path):
    from bitvit.data.cifar import _numpy_reconstruct

    class Bomb:  # a 200-byte pickle naming an 18 GB array
        def __reduce__(self):
            return (_numpy_reconstruct(), (np.ndarray, (6_000_000, 3072), b"B"))

    with pytest.raises(DataError, match="refusing numpy _reconstruct of shape "
                                        "\\(6000000, 3072\\)"):
        safe_unpickle(pickle.dumps({b"data": Bomb(), b"labels": []}, protocol=2), "x")
    class Call:  # numpy.ndarray called itself: any shape, memory the file never held
        def __reduce__(self):
            return (np.ndarray, ((6_000_000, 3072), "B"))

    with pytest.raises(DataError, match="refusing a call of numpy.ndarray"):
        safe_unpickle(pickle.dumps({b"data": Call(), b"labels": []}, protocol=2), "x")
    real = np.arange(12, dtype=np.uint8).reshape(3, 4)  # numpy's own pickles still load
    assert np.array_equal(safe_unpickle(pickle.dumps(real, protocol=2)), real)

    d = write_python(tmp_path / "py", make_arrays())
    (d / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]}, protocol=2))
    with pytest.raises(DataError) as e:
        read_images(d, 32, 3)
    assert one_line(e).endswith("data_batch_1: key labels must be a list of integer class "
                                "indices")
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": 5}, protocol=2))
    with pytest.raises(DataError) as e:
        read_images(d, 32, 3)
    assert one_line(e).endswith("batches.meta: label_names must be a list of class names, got "
                                "int")


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def test_a_cache_file_bitvit_did_not_write_is_a_miss(tmp_path):
    from bitvit.data.cache import _load_cache, _load_stats

    npz = tmp_path / "c.npz"
    np.save(npz.open("wb"), np.zeros(3))  # a bare .npy where the .npz should be
    assert _load_cache(npz, "key") is None
    np.savez(npz.open("wb"), key=np.array("key"), classes=np.array(5))  # 0-d classes
    assert _load_cache(npz, "key") is None
    # Well-formed arrays, but a label past the 2 classes (training hit "Target 6 is out of
    # bounds"), or below 0.
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    for bad in ([0, 6], [-1, 1]):
        np.savez(npz.open("wb"), key=np.array("key"), classes=np.array(["a", "b"]),
                 train_images=images, train_labels=np.array(bad, dtype=np.int64),
                 test_images=images, test_labels=np.array([0, 1], dtype=np.int64))
        assert _load_cache(npz, "key") is None
    np.savez(npz.open("wb"), key=np.array("key"), classes=np.array(["a", "b"]),
             train_images=images, train_labels=np.array([1, 0], dtype=np.int64),
             test_images=images, test_labels=np.array([0, 1], dtype=np.int64))
    assert _load_cache(npz, "key") is not None
    stats = tmp_path / "s.json"
    stats.write_text("[" * 100_000 + "]" * 100_000)
    assert _load_stats(stats, "key", 3) is None
    stats.write_text(json.dumps({"key": "key", "mean": [10 ** 400] * 3, "std": [1, 1, 1]}))
    assert _load_stats(stats, "key", 3) is None


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.npz"))


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    arrays = make_arrays(per_class_train=2, per_class_test=1)
    src = write_folder(tmp_path / "imgs", arrays)
    first = read_images(src, 32, 3)
    assert len(_cache_files(tmp_path)) == 1

    real_decode = data_sources._decode

    def boom(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data_sources, "_decode", boom)
    second = read_images(src, 32, 3)  # hit: no decoding
    assert torch.equal(first[0].images, second[0].images)

    # Changing a file's content (size/mtime) invalidates the cache.
    victim = src / "train" / "cat" / sorted(os.listdir(src / "train" / "cat"))[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(victim)
    with pytest.raises(AssertionError, match="decoded although cached"):
        read_images(src, 32, 3)
    monkeypatch.setattr(data_sources, "_decode", real_decode)
    third = read_images(src, 32, 3)
    assert not torch.equal(first[0].images, third[0].images)
    assert (third[0].images[third[0].labels == 3][0, :, 0, 0] == torch.tensor([1, 2, 3])).all()

    # A different image_size or channel count is its own cache entry.
    read_images(src, 16, 3)
    read_images(src, 32, 1)
    assert len(_cache_files(tmp_path)) == 4


def test_tarball_cache_hit_skips_reading_archive(tmp_path, monkeypatch):
    tar = make_tar(write_binary(tmp_path / "b", make_arrays(2, 1)), tmp_path / "c.tar.gz")
    first = read_images(tar, 32, 3)
    monkeypatch.setattr(data_sources, "_read_tar",
                        lambda p: pytest.fail("archive read on a cache hit"))
    second = read_images(tar, 32, 3)
    assert torch.equal(first[0].images, second[0].images)
    # Same bytes under another name hit the same content key but get their own file name.
    tar.rename(tmp_path / "renamed.tar.gz")
    monkeypatch.undo()
    assert torch.equal(read_images(tmp_path / "renamed.tar.gz", 32, 3)[1].labels,
                       first[1].labels)


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    src = write_binary(tmp_path / "b", make_arrays(2, 1))
    first = read_images(src, 32, 3)
    (cache,) = _cache_files(tmp_path)
    cache.write_bytes(b"not a zip at all")
    with caplog.at_level(logging.WARNING, logger="bitvit.data"):
        again = read_images(src, 32, 3)
    assert "rebuilding" in caplog.text
    assert torch.equal(first[0].images, again[0].images)
    with np.load(cache, allow_pickle=False) as z:  # rewritten, and safe to load
        assert z["train_images"].shape == (20, 3, 32, 32)
    assert not list((tmp_path / "cache").glob("*.tmp"))


# ------------------------------------------------------------------------------------------
# Subsets and validation split
# ------------------------------------------------------------------------------------------


def _ids(n, classes=10, per_class=None):
    """A set whose image i holds i in its first pixels, so images identify themselves."""
    labels = torch.arange(n) % classes if per_class is None else torch.tensor(per_class)
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    idx = torch.arange(len(labels))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(
        torch.uint8)
    return ImageSet(images, labels, [str(c) for c in range(classes)])


def _id_of(s: ImageSet) -> list[int]:
    return (s.images[:, 0, 0, 0].long() * 256 + s.images[:, 0, 0, 1].long()).tolist()


def test_balanced_subset():
    s = _ids(200)
    a = balanced_subset(s, 30, seed=1)
    assert torch.bincount(a.labels, minlength=10).tolist() == [3] * 10
    assert _id_of(a) == _id_of(balanced_subset(s, 30, seed=1))  # seeded
    assert _id_of(a) != _id_of(balanced_subset(s, 30, seed=2))
    assert len(set(_id_of(a))) == 30
    counts = torch.bincount(balanced_subset(s, 35, seed=0).labels, minlength=10)
    assert counts.max() - counts.min() == 1 and counts.sum() == 35
    assert balanced_subset(s, 1000, seed=0) is s
    # A short class gives what it has; the rest is filled from the others.
    skew = _ids(0, classes=2, per_class=[0] * 2 + [1] * 50)
    assert torch.bincount(balanced_subset(skew, 10, 0).labels).tolist() == [2, 8]
    with pytest.raises(DataError):
        balanced_subset(s, 0, seed=0)


def test_limit_decodes_the_same_subset(tmp_path, monkeypatch):
    src = write_folder(tmp_path / "imgs", make_arrays(4, 3))
    calls = []
    real = data_folder._decode_image
    monkeypatch.setattr(data_folder, "_decode_image", lambda *a: calls.append(a[1]) or real(*a))
    tr, te = read_images(src, 32, 3, limit_train=20, limit_test=10, seed=3)
    assert len(calls) == 30  # only the chosen images were decoded
    assert not _cache_files(tmp_path)
    full_tr, full_te = read_images(src, 32, 3)
    for part, full in ((tr, full_tr), (te, full_te)):
        ref = balanced_subset(full, len(part), seed=3)
        assert torch.equal(part.images, ref.images) and torch.equal(part.labels, ref.labels)
    # With the full cache present, a limited read comes from it.
    calls.clear()
    tr2, _ = read_images(src, 32, 3, limit_train=20, limit_test=10, seed=3)
    assert not calls and torch.equal(tr2.images, tr.images)


def test_validation_split_is_disjoint_and_seeded():
    s = _ids(300)
    train, val = split_validation(s, 50, seed=7)
    t_ids, v_ids = set(_id_of(train)), set(_id_of(val))
    assert len(val) == 50 and len(train) == 250
    assert not t_ids & v_ids and t_ids | v_ids == set(range(300))
    assert torch.bincount(val.labels, minlength=10).tolist() == [5] * 10
    assert _id_of(split_validation(s, 50, seed=7)[1]) == _id_of(val)
    assert _id_of(split_validation(s, 50, seed=8)[1]) != _id_of(val)
    with pytest.raises(DataError, match="val_size"):
        split_validation(s, 300, seed=0)
    # 15 images: classes 5-9 have one each, and a validation set of 10 would take them whole.
    small = s.subset(torch.from_numpy(np.flatnonzero(
        np.isin(np.arange(300), [*range(10), *range(10, 15)]))))
    assert torch.bincount(small.labels, minlength=10).tolist() == [2] * 5 + [1] * 5
    with pytest.raises(DataError, match=r"^data.val_size=10 takes every training image of 5 "
                                        r"class\(es\) \("):
        split_validation(small, 10, seed=0)
    assert len(split_validation(small, 5, seed=0)[1]) == 5  # one of each of 5 classes: fine


# ------------------------------------------------------------------------------------------
# Any image folder: grayscale, odd sizes, modes
# ------------------------------------------------------------------------------------------


def _mixed_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    specs = {
        "gray": lambda: Image.fromarray(rng.integers(0, 256, (17, 23), dtype=np.uint8), "L"),
        "rgba": lambda: Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)),
        "big": lambda: Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)),
    }
    for split in ("train", "test"):
        for cls, make in specs.items():
            (root / split / cls).mkdir(parents=True)
            make().save(root / split / cls / "a.png")
            make().convert("RGB").save(root / split / cls / "b.JPG", quality=90)
            make().convert("P").save(root / split / cls / "c.png")
    return root


def test_grayscale_and_odd_sized_images(tmp_path):
    src = _mixed_folder(tmp_path / "any")
    tr, te = read_images(src, 24, 3)
    assert tr.classes == ["big", "gray", "rgba"]  # sorted folder names
    assert tr.images.shape == (9, 3, 24, 24) and te.images.shape == (9, 3, 24, 24)
    assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    gray_png = tr.images[3]  # gray/a.png: grayscale replicated to RGB
    assert torch.equal(gray_png[0], gray_png[1]) and torch.equal(gray_png[1], gray_png[2])
    one, _ = read_images(src, 8, 1)
    assert one.images.shape == (9, 1, 8, 8) and one.images.dtype == torch.uint8
    s = load_data(DataConfig(path=str(src), mean=(0.5,), std=(0.25,)), image_size=8, channels=1)
    assert s.train.images.shape[1] == 1


def test_16_bit_images_read_as_their_high_byte_in_every_mode_pil_gives(tmp_path):
    from bitvit.data import decode_image

    a = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # high bytes 0..255
    png, ppm = io.BytesIO(), b"P5 16 16 65535\n" + a.astype(">u2").tobytes()
    Image.fromarray(a).save(png, format="PNG")  # PIL: mode I;16; a 16-bit PPM: mode I
    for data in (png.getvalue(), ppm):
        got = decode_image(data, "x", 16, 1)[0]
        assert np.array_equal(got, (a >> 8).astype(np.uint8))
    tiff32 = io.BytesIO()  # a 32-bit integer TIFF of 8-bit values: as they are
    Image.fromarray((a >> 8).astype(np.int32)).save(tiff32, format="TIFF")
    assert np.array_equal(decode_image(tiff32.getvalue(), "x", 16, 1)[0], (a >> 8))
    floats = io.BytesIO()
    Image.fromarray(a.astype(np.float32) / 65535).save(floats, format="TIFF")
    with pytest.raises(DataError, match="^f.tif: a floating-point image with values "
                                        "0..0.996109, which has no fixed range"):
        decode_image(floats.getvalue(), "f.tif", 16, 1)


# ------------------------------------------------------------------------------------------
# Bad inputs: each gives one clear line (or a logged skip)
# ------------------------------------------------------------------------------------------


def test_non_image_files_are_skipped_with_a_log(tmp_path, caplog):
    src = write_folder(tmp_path / "imgs", make_arrays(1, 1))
    (src / "train" / "cat" / "notes.txt").write_text("hi")
    (src / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (src / "train" / "README").write_text("loose file")
    with caplog.at_level(logging.WARNING, logger="bitvit.data"):
        tr, _ = read_images(src, 32, 3)
    assert len(tr) == 10 and "skipped 3 non-image" in caplog.text


@pytest.mark.parametrize("case", ["corrupt_image", "empty_class", "no_test", "class_mismatch",
                                  "tar_empty_class"])
def test_bad_image_folders(tmp_path, case):
    src = write_folder(tmp_path / "imgs", make_arrays(1, 1))
    expect = {"corrupt_image": "0003.png", "empty_class": "empty class folder",
              "no_test": "train/<class>/", "class_mismatch": "differ",
              "tar_empty_class": "empty class folder"}[case]
    if case == "corrupt_image":
        (src / "train" / "cat" / "0003.png").write_bytes(b"\x89PNG not really")
    elif case in ("empty_class", "tar_empty_class"):
        (src / "test" / "zebra").mkdir()
        (src / "train" / "zebra").mkdir()
        if case == "tar_empty_class":
            src = make_tar(src, tmp_path / "imgs.tar.gz")
    elif case == "no_test":
        os.rename(src / "test", src / "val")
    elif case == "class_mismatch":
        os.rename(src / "test" / "cat", src / "test" / "kitten")
    with pytest.raises(DataError) as e:
        read_images(src, 32, 3)
    assert expect in one_line(e)


def test_bad_official_files(tmp_path):
    arrays = make_arrays(1, 1)
    bn = write_binary(tmp_path / "b", arrays)
    (bn / "data_batch_2.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError) as e:
        read_images(bn, 32, 3)
    assert "data_batch_2.bin" in one_line(e) and "3073" in str(e.value)

    bn2 = write_binary(tmp_path / "b2", arrays)
    (bn2 / "test_batch.bin").write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(DataError, match="labels must be in 0..9"):
        read_images(bn2, 32, 3)

    py = write_python(tmp_path / "p", arrays)
    (py / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        read_images(py, 32, 3)
    assert "data_batch_3 is missing" in one_line(e)

    py2 = write_python(tmp_path / "p2", arrays)
    (py2 / "data_batch_1").write_bytes(pickle.dumps({b"labels": [1]}, protocol=2))
    with pytest.raises(DataError) as e:
        read_images(py2, 32, 3)
    assert "data_batch_1" in one_line(e) and "'data'" in str(e.value)

    py3 = write_python(tmp_path / "p3", arrays)
    (py3 / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        read_images(py3, 32, 3)


def test_bad_files_and_paths(tmp_path, monkeypatch):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is no archive")
    with pytest.raises(DataError) as e:
        read_images(junk, 32, 3)
    assert "not a readable tar archive" in one_line(e)

    good = make_tar(write_folder(tmp_path / "imgs", make_arrays(1, 1)), tmp_path / "g.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        read_images(cut, 32, 3)
    assert "cut.tar.gz" in one_line(e)

    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        read_images(tmp_path / "emptydir", 32, 3)
    with pytest.raises(DataError, match=r"model.in_channels=2: images are read with 1 "
                                        r"\(grayscale\) or 3 \(RGB\) channels; expected 1 or 3"):
        read_images(tmp_path / "imgs", 32, 2)
    with pytest.raises(DataError, match="does not exist"):
        find_data(str(tmp_path / "nope"))
    monkeypatch.setenv("BITVIT_DATA", str(tmp_path / "nope2"))
    with pytest.raises(DataError, match="BITVIT_DATA"):
        find_data(None)
    monkeypatch.setenv("BITVIT_DATA", str(good))
    assert find_data(None) == good
    assert find_data(str(tmp_path / "imgs")) == tmp_path / "imgs"
    monkeypatch.delenv("BITVIT_DATA")
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    with pytest.raises(DataError) as e:
        find_data(None)
    assert "--data" in one_line(e) and "BITVIT_DATA" in str(e.value)


def test_config_errors(tmp_path):
    src = write_binary(tmp_path / "b", make_arrays(1, 1))
    with pytest.raises(DataError) as e:
        load_data(DataConfig(path=str(src), mean=(0.5,)))
    assert "data.mean" in one_line(e)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(path=str(src), mean=(0.5,), std=(0.5, 0.5)), channels=1)
    assert "data.std" in one_line(e)
    with pytest.raises(DataError, match="data.val_size"):
        load_data(DataConfig(path=str(src), val_size=10))
    with pytest.raises(ConfigError, match="data.limit_train=0: expected null or an integer"):
        load_config(None, [f"data.path={src}", "data.limit_train=0"])
    with pytest.raises(ConfigError, match="unknown key data.bogus"):
        load_config(None, ["data.bogus=1"])
    cfg = load_config(None, ["data.mean=[0.5, 0.5, 0.5]", "data.val_size=5"])
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert Config.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------
# Download from a local HTTP server
# ------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """Serve {path: bytes} on 127.0.0.1; paths starting with /cut send half the body."""
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path.startswith("/slow"):  # a byte at a time
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.01)
            else:
                self.wfile.write(body[: len(body) // 2] if self.path.startswith("/cut") else body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, hits
    httpd.shutdown()
    httpd.server_close()


def test_download(tmp_path, server, monkeypatch):
    base, files, hits = server
    arrays = make_arrays(1, 1)
    body = make_tar(write_python(tmp_path / "src", arrays), tmp_path / "p.tar.gz").read_bytes()
    md5 = hashlib.md5(body).hexdigest()
    files["/c.tar.gz"] = files["/cut.tar.gz"] = body
    cache = tmp_path / "dl"

    with pytest.raises(DataError) as e:
        download_cifar10(cache, f"{base}/c.tar.gz", "0" * 32)
    assert "MD5" in one_line(e) and "not using it" in str(e.value)
    assert not list(cache.iterdir())  # nothing left behind

    with pytest.raises(DataError) as e:
        download_cifar10(cache, f"{base}/cut.tar.gz", md5)
    assert "truncated" in one_line(e)
    assert not list(cache.iterdir())

    with pytest.raises(DataError, match="could not download"):
        download_cifar10(cache, f"{base}/missing.tar.gz", md5)
    n = len(hits)
    with pytest.raises(DataError, match="MD5 '0123' .*: expected 32 hexadecimal digits"):
        download_cifar10(cache, f"{base}/c.tar.gz", "0123")
    assert len(hits) == n  # refused before fetching

    # What a killed download left is removed by the next, once nobody has written it for long.
    stale, fresh = cache / ".download-killed.tmp", cache / ".download-running.tmp"
    stale.write_bytes(b"x"), fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600,) * 2)
    with pytest.raises(DataError, match="could not download"):
        download_cifar10(cache, f"{base}/missing.tar.gz", md5)
    assert not stale.exists() and fresh.exists()
    fresh.unlink()

    # No endless or oversized body fills the disk; a malformed address is one line too.
    import bitvit.data.download as download

    monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", len(body) - 1)
    with pytest.raises(DataError, match=f"download of {base}/c.tar.gz is {len(body)} bytes, "
                                        f"over {len(body) - 1} "):
        download_cifar10(cache, f"{base}/c.tar.gz", md5)
    monkeypatch.setattr(download, "_check_room", lambda *a: None)  # as a body without a length
    with pytest.raises(DataError, match=f"passed {len(body) - 1} bytes .*stopped, not using it"):
        download_cifar10(cache, f"{base}/c.tar.gz", md5)
    assert not list(cache.iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: SimpleNamespace(free=10))
    with pytest.raises(DataError, match=f"needs {len(body)} bytes but {cache} has 10 free"):
        download_cifar10(cache, f"{base}/c.tar.gz", md5)
    monkeypatch.undo()
    files["/slow.tar.gz"] = body[:100]
    monkeypatch.setattr(download, "MAX_DOWNLOAD_SECONDS", 0.2)
    with pytest.raises(DataError, match=f"^download of {base}/slow.tar.gz took over 0.2 s \\("):
        download_cifar10(cache, f"{base}/slow.tar.gz", md5)
    assert not list(cache.iterdir())
    monkeypatch.undo()
    with pytest.raises(DataError, match="^could not download http://127.0.0.1:8x/c.tar.gz: "):
        download_cifar10(cache, "http://127.0.0.1:8x/c.tar.gz", md5)

    # Address and checksum from the environment; a second call reuses the file.
    monkeypatch.setenv("BITVIT_CIFAR10_URL", f"{base}/c.tar.gz")
    monkeypatch.setenv("BITVIT_CIFAR10_MD5", md5)
    n = len(hits)
    got = download_cifar10(cache)
    assert got.read_bytes() == body and len(hits) == n + 1
    assert download_cifar10(cache) == got and len(hits) == n + 1

    s = load_data(DataConfig(download=True, cache_dir=str(tmp_path / "dl2"),
                             download_url=f"{base}/c.tar.gz", download_md5=md5))
    assert torch.equal(s.train.images, torch.from_numpy(arrays[0]))
    assert (tmp_path / "dl2" / "cifar-10-python.tar.gz").exists()


# ------------------------------------------------------------------------------------------
# Normalize and augment
# ------------------------------------------------------------------------------------------


def test_normalize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x, (0.0, 0.5, 0.1), (1.0, 0.5, 0.2))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(normalize(x[0], (0.0,) * 3, (1.0,) * 3)[1], torch.ones(2, 2))
    with pytest.raises(DataError, match="data.mean"):
        normalize(x, (0.5,), (0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="uint8"):
        normalize(x.float(), (0.5,) * 3, (0.5,) * 3)


def test_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    assert augment(x, DataConfig()) is x

    f = augment(x, DataConfig(horizontal_flip=True), torch.Generator().manual_seed(1))
    same = (f == x).flatten(1).all(1)
    flipped = (f == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()

    cfg = DataConfig(random_crop=True, crop_padding=2)
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert c.shape == x.shape and c.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(c[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, f"image {i} is not a padded crop"
        shifts.add(hits[0])
    assert len(shifts) > 5  # offsets vary per image
    again = augment(x, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(c, again)
    both = augment(x, DataConfig(random_crop=True, horizontal_flip=True))
    assert both.shape == x.shape


# ------------------------------------------------------------------------------------------
# The real data
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="shared CIFAR-10 tarball not present")
def test_real_tarball_balanced_subset():
    s = load_data(DataConfig(path=str(REAL), limit_train=300, limit_test=100, val_size=50))
    assert s.classes == CLASSES
    assert (len(s.train), len(s.val), len(s.test)) == (250, 50, 100)
    assert s.train.images.shape[1:] == (3, 32, 32) and s.train.images.dtype == torch.uint8
    counts = torch.bincount(torch.cat([s.train.labels, s.val.labels]), minlength=10)
    assert counts.tolist() == [30] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [10] * 10
    assert s.train.images.float().std() > 20  # real pictures, not blank


def test_unpickler_admits_both_numpy_module_names():
    arr = np.arange(12, dtype=np.uint8).reshape(2, 6)
    obj = {b"data": arr, b"labels": [np.int64(3)], "name": "x", b"b": b"\xff"}
    for official in (False, True):
        out = safe_unpickle(_pickle(obj, official_name=official))
        assert np.array_equal(out[b"data"], arr) and out[b"data"].dtype == np.uint8
        assert out[b"labels"] == [3] and out["name"] == "x" and out[b"b"] == b"\xff"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 70),
       st.integers(0, 3))
def test_balanced_subset_properties(labels, n, seed):
    s = ImageSet(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), torch.tensor(labels),
                 [str(c) for c in range(5)])
    idx = D._balanced_indices(s.labels.numpy(), n, seed)
    assert len(idx) == min(n, len(labels)) and len(set(idx.tolist())) == len(idx)
    assert (np.diff(idx) > 0).all()
    have = np.bincount(labels, minlength=5)
    got = np.bincount(s.labels.numpy()[idx], minlength=5)
    # Round-robin: a class is short of another's count only when it ran out of images.
    for a in range(5):
        for b in range(5):
            assert got[a] >= got[b] - 1 or got[a] == have[a]
