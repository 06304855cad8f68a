"""Limits on what bitvit reads and builds, through the real command line, each ending in one
line on stderr and exit status 2: config and sweep files (regular, at most 1 MiB, not empty), a
model that cannot fit in memory (refused from its config before anything is built) or an
allocation that fails (run.json marked failed), images over the pixel limit (refused from their
header), files of a data set (regular, within a size limit: no tar.gz bomb, FIFO or /dev/zero),
images only in the common formats (no ICO decoding its insides first), a data set of one class,
predict going on past unreadable images, and weights files larger than the memory (a sparse
file, a zip bomb) refused unread."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import resource
import shutil
import signal
import struct
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_16PX, one_line_error, write_image_folder, write_pngs
from PIL import Image, ImageFile

import bitvit.training.checkpoint
import bitvit.training.loop
from bitvit.cli import main
from bitvit.data import DataError, decode_image
from bitvit.data.base import max_file_bytes
from bitvit.data.tree import _read_tar
from bitvit.nn.footprint import estimate, parameter_count
from bitvit.nn.model import ViTConfig
from bitvit.training.checkpoint import build_model
from bitvit.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 "
             "bytes. Error code 12 (Cannot allocate memory)")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path_factory.getbasetemp() / "limits-cache"))


# --- config and sweep files ------------------------------------------------------------------


def test_config_that_is_a_device_is_refused_at_once(capsys):
    start = time.perf_counter()
    err = one_line_error(capsys, "train", "--config", "/dev/zero")
    assert err.endswith("/dev/zero: not a regular file (a character device); expected a YAML "
                        "config file")
    assert time.perf_counter() - start < 10  # not reading an endless stream of zeros
    err = one_line_error(capsys, "sweep", "/dev/zero")
    assert "/dev/zero: not a regular file (a character device); expected a YAML sweep" in err


def test_config_of_50_mb_is_refused_unread(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(50 * 2 ** 20)  # sparse: 50 MB by its size, nothing on disk
    err = one_line_error(capsys, "train", "--config", str(big))
    assert err.endswith(f"{big}: 52,428,800 bytes; a YAML config file is at most 1,048,576 bytes")
    assert f"{big}: 52,428,800 bytes" in one_line_error(capsys, "profile", str(big))


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_an_empty_config_is_an_error_naming_it(tmp_path, capsys, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    err = one_line_error(capsys, "train", "--config", str(empty), "--out", str(tmp_path / "r"))
    assert err.endswith(f"{empty}: empty config file; expected a mapping with sections model, "
                        "quant, data, train")
    assert f"{empty}: empty sweep file" in one_line_error(capsys, "sweep", str(empty))
    assert not (tmp_path / "r").exists()


# --- memory: refused from the estimate, allocator failures caught --------------------------------


@pytest.mark.parametrize("model", [
    ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, heads=2, mlp_ratio=2,
              num_classes=2),
    ViTConfig(image_size=32, patch_size=8, dim=48, depth=3, heads=4, mlp_ratio=2.5,
              num_classes=7, pooling="mean"),
    ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=3,
              qkv_bias=False, final_norm="none"),
])
@pytest.mark.parametrize("quant", ["fp", "b158", "sign"])
def test_the_estimate_counts_the_parameters_of_the_built_model(model, quant):
    config = load_config(None, [("quant.method", quant)])
    config.model = model
    built = build_model(config)
    assert parameter_count(model) == sum(p.numel() for p in built.parameters())
    q = config.quant
    training = estimate(model, 8, True, q.method, q.where, q.include_patch_embed)
    inference = estimate(model, 8, False)
    assert training.state_bytes >= 16 * parameter_count(model) > inference.state_bytes
    assert training.activation_bytes > inference.activation_bytes > 0


@pytest.mark.parametrize("overrides, size", [
    (["model.dim=1000000000"], "model.dim=1000000000, model.depth=1,"),
    (["model.dim=100000", "model.depth=1000"], "model.dim=100000, model.depth=1000,"),
])
def test_a_model_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, capsys,
                                                                      monkeypatch, overrides,
                                                                      size):
    def never(*args, **kwargs):
        raise AssertionError("nothing may be read or built")

    monkeypatch.setattr(bitvit.training.loop, "load_data", never)
    monkeypatch.setattr(bitvit.training.loop, "build_model", never)
    out = tmp_path / "run"
    start = time.perf_counter()
    err = one_line_error(capsys, "train", "--out", str(out), *TINY_16PX, *overrides)
    assert time.perf_counter() - start < 5
    assert f"training this model ({size}" in err and "of memory but" in err
    assert " is available (" in err  # MemAvailable, a cgroup limit, psutil or sysconf
    assert "make model.dim, model.depth or train.batch_size smaller" in err
    assert not out.exists()  # a refused config leaves nothing behind
    err = one_line_error(capsys, "profile", str(ROOT / "configs/paper.yaml"), *overrides)
    assert "its model (model.dim=" in err and "of memory but" in err


def test_processes_on_one_host_share_its_memory(monkeypatch):
    from bitvit.training import memory
    from bitvit.training.config import load_config

    config = load_config(None, TINY_16PX)
    need = memory.estimate(config.model, config.train.batch_size // 2, True, "b158", "all", True)
    monkeypatch.setattr(memory, "host_memory", lambda: (int(need.total * 1.5), "a test's"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    memory.check_training_fits(config, torch.device("cpu"), 1)  # one process: fits
    with pytest.raises(memory.MemoryLimitError, match="a test's, shared by 2 processes on this "
                                                      "host"):
        memory.check_training_fits(config, torch.device("cpu"), 2)


def test_the_cgroup_limit_is_read_where_this_process_lives(tmp_path):
    from bitvit.system import _cgroup_headroom

    def cgroup(folder, limit, usage, inactive=0, v1=False):
        folder.mkdir(parents=True, exist_ok=True)
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 \
            else ("memory.max", "memory.current", "inactive_file")
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\n")

    mount, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    cgroup(mount, "max", 10**9)  # the root: no limit
    cgroup(mount / "job_7", 5000, 4900)  # a scheduler's job: 100 left ...
    cgroup(mount / "job_7" / "step_0", 1000, 400, inactive=100)  # ... its step: 700
    proc.write_text("0::/job_7/step_0\n")
    assert _cgroup_headroom(mount, proc) == 100  # the tightest of the folder and its parents
    proc.write_text("0::/\n")  # inside a cgroup namespace: the mount is its own
    assert _cgroup_headroom(mount, proc) is None
    cgroup(mount / "memory" / "slurm", 2000, 500, v1=True)
    proc.write_text("5:cpu,cpuacct:/slurm\n4:memory:/slurm\n")  # v1
    assert _cgroup_headroom(mount, proc) == 1500
    assert _cgroup_headroom(mount, tmp_path / "unreadable") is None  # the roots: no limits


def test_available_memory_falls_back_and_unknown_memory_refuses_nothing(monkeypatch):
    from bitvit import system as memory  # where the memory available is read

    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)  # no /proc/meminfo
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails
    free, how = memory.host_memory()
    assert free > 0 and how == "free pages (sysconf)"
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 1000)  # a tight cgroup wins
    assert memory.host_memory() == (1000, "this cgroup's memory limit less its usage")

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    monkeypatch.setattr(os, "sysconf", no_sysconf)
    assert memory.host_memory() is None
    # Unknown: nothing is refused (the allocator's error, caught, would still be one line).
    from bitvit.training.memory import check_training_fits

    check_training_fits(load_config(None, ["model.dim=1000000000"]), torch.device("cpu"))


def test_out_of_memory_while_building_the_model_marks_the_run_failed(tiny_run, tmp_path, capsys,
                                                                     monkeypatch):
    def no_memory(config):
        raise RuntimeError(ALLOCATOR)

    monkeypatch.setattr(bitvit.training.loop, "build_model", no_memory)
    out = tmp_path / "run"
    err = one_line_error(capsys, "train", "--data", str(tiny_run["images"]), "--out", str(out),
                         "--epochs", "1", "--quiet", *TINY_16PX)
    assert "out of memory while setting up the run (data, model, optimizer) (DefaultCPU" in err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "out of memory" in info["error"]

    # A resumed run keeps its history, and says why this invocation failed.
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run["run"], resumed)
    err = one_line_error(capsys, "train", "--resume", str(resumed), "--epochs", "2", "--quiet")
    assert "out of memory while setting up the run" in err
    info = json.loads((resumed / "run.json").read_text())
    assert info["status"] == "failed" and len(info["resumed_from"]) == 1
    assert (resumed / "last/state.pt").is_file()


def test_out_of_memory_in_an_epoch_marks_the_run_failed(tiny_run, tmp_path, capsys, monkeypatch):
    def no_memory(s, loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(bitvit.training.loop, "_step", no_memory)
    out = tmp_path / "run"
    err = one_line_error(capsys, "train", "--data", str(tiny_run["images"]), "--out", str(out),
                         "--epochs", "1", "--quiet", *TINY_16PX)
    assert "out of memory while training epoch 1" in err and "Tried to allocate 20.00 GiB" in err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "out of memory" in info["error"]


def test_a_gpu_out_of_memory_does_not_report_the_hosts_memory():
    from bitvit.training import memory

    gpu = memory.out_of_memory(torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB "
        "of which 1.00 GiB is free.\nmore"), "training epoch 3")
    assert str(gpu) == ("out of memory while training epoch 3 (CUDA out of memory. Tried to "
                        "allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB of which 1.00 "
                        "GiB is free.)")
    cpu = memory.out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"), "x")
    assert "available (" in str(cpu)


@pytest.mark.parametrize("error", [RuntimeError(ALLOCATOR), torch.OutOfMemoryError("CUDA out of "
                                   "memory. Tried to allocate 2.00 GiB"), MemoryError()])
def test_out_of_memory_in_eval_export_and_profile_is_one_line(tiny_run, tmp_path, capsys,
                                                              monkeypatch, error):
    def no_memory(config):
        raise error

    monkeypatch.setattr(bitvit.training.checkpoint, "build_model", no_memory)
    for argv in (["eval", str(tiny_run["run"]), "--device", "cpu"],
                 ["export", str(tiny_run["run"]), "--out", str(tmp_path / "m.safetensors")],
                 ["profile", str(tiny_run["run"])]):
        err = one_line_error(capsys, *argv)
        assert f"out of memory while bitvit {argv[0]} ran" in err


# --- images: the pixel limit, one class ---------------------------------------------------------


def record_decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image PIL decodes from now on (the test's own list, filled as it runs)."""
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_a_144_megapixel_png_is_refused_before_decoding(tiny_run, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144M pixels, 17 KB on disk
    decoded = record_decoded_sizes(monkeypatch)
    err = one_line_error(capsys, "predict", str(tiny_run["export"]), str(big), "--device", "cpu")
    assert err.endswith(f"{big}: 12000x12000 = 144,000,000 pixels, over bitvit's limit of "
                        "16,000,000 (BITVIT_MAX_IMAGE_PIXELS raises it); not decoded")
    assert (12000, 12000) not in decoded  # PIL's DecompressionBombWarning printed nothing


def test_the_pixel_limit_applies_to_training_data_and_is_configurable(tiny_run, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "100")  # the 16x16 images have 256
    err = one_line_error(capsys, "train", "--data", str(tiny_run["images"]), "--out",
                         str(tmp_path / "r"), "--epochs", "1", "--quiet", *TINY_16PX,
                         "data.cache_dir=" + str(tmp_path / "fresh-cache"))
    assert "16x16 = 256 pixels, over bitvit's limit of 100" in err and "/train/cat/" in err
    monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "lots")
    image = next(tiny_run["images"].rglob("*.png"))
    err = one_line_error(capsys, "predict", str(tiny_run["export"]), str(image))
    assert "BITVIT_MAX_IMAGE_PIXELS='lots': expected a positive integer" in err


def test_a_data_set_of_one_class_is_an_error_naming_it(tmp_path, capsys):
    one = write_image_folder(tmp_path / "one", ("cat",))
    out = tmp_path / "run"
    err = one_line_error(capsys, "train", "--data", str(one), "--out", str(out), "--quiet",
                         *TINY_16PX, "model.num_classes=1")
    assert err.endswith(f"{one}: 1 class (cat); classification needs at least two (one folder "
                        "per class under train/ and test/)")
    assert not out.exists()


# --- files of a data set: regular, within a size limit; images in the common formats ---------

LIMIT_NOTE = "(BITVIT_MAX_IMAGE_PIXELS raises it: 8 bytes per pixel)"


@contextlib.contextmanager
def bounded(seconds: float, extra_bytes: int) -> Iterator[None]:
    """Fail within ``seconds`` and ``extra_bytes`` more address space instead of hanging on a
    FIFO or reading /dev/zero until the machine runs out (what these tests check never does)."""
    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text()
              .splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, vm + extra_bytes)
    previous = signal.signal(signal.SIGALRM, hung)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def test_the_file_limit_fits_images_at_the_pixel_limit_and_cifar_batches(tmp_path, monkeypatch):
    assert max_file_bytes() == 128_000_000  # 16 MP of uncompressed 16-bit RGBA
    monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "50000000")
    assert max_file_bytes() == 400_000_000
    # Never below 64 MiB: an official CIFAR-10 batch (31 MB) loads whatever the pixel limit.
    monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "1")
    assert max_file_bytes() == 64 << 20
    archive = tmp_path / "cifar-10-batches.tar"
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.size = 31_035_704  # the official python version's data_batch_1
    with tarfile.open(archive, "w") as tar:
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    assert len(_read_tar(archive).files["cifar-10-batches-py/data_batch_1"]()) == member.size


def test_a_tar_member_over_the_file_limit_is_refused_unread(tmp_path, capsys):
    archive = tmp_path / "bomb.tar.gz"
    member = tarfile.TarInfo("ds/train/a/x.png")
    # What a 3 MB gzip of zeros inflates to. Only the header is written: bitvit must refuse
    # from it, and never read on (an unexpected end of the archive would show it did).
    member.size = 3 << 30
    with gzip.open(archive, "wb") as f:
        f.write(member.tobuf())
    start = time.perf_counter()
    err = one_line_error(capsys, "train", "--data", str(archive), "--out", str(tmp_path / "r"),
                         "--epochs", "1", "--quiet", *TINY_16PX)
    assert err.endswith(f"{archive}:ds/train/a/x.png: 3,221,225,472 bytes; a PNG, JPEG or "
                        f"other image is at most 128,000,000 bytes {LIMIT_NOTE}; not read")
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "r").exists()


def test_an_archive_that_inflates_past_half_the_memory_is_refused(tmp_path, monkeypatch):
    from bitvit.data import DataError, tree

    # Many members, each within the file limit, add up: a gzip of zeros has no ceiling.
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(4):
            member = tarfile.TarInfo(f"ds/train/a/{i}.png")
            member.size = 400
            tar.addfile(member, io.BytesIO(bytes(400)))
    monkeypatch.setattr(tree, "host_memory", lambda: (2000, "a test's 2000 bytes"))
    with pytest.raises(DataError, match=r"inflate past 1000 B, half the memory available "
                                        r"\(a test's 2000 bytes\); extract the archive"):
        tree._read_tar(archive)
    monkeypatch.setattr(tree, "host_memory", lambda: None)  # unknown: nothing refused
    assert len(tree._read_tar(archive).files) == 4


@pytest.mark.parametrize("kind", ["pax", "GNU long-name"])
def test_a_tar_header_that_would_inflate_is_refused_before_it_is_read(tmp_path, monkeypatch,
                                                                     kind):
    from bitvit.data import DataError, tree

    archive = tmp_path / "header.tar.gz"
    fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        member = tarfile.TarInfo("ds/train/a/" + "x" * 3000 + ".png")  # a 3 kB name: a header
        member.size = 4
        tar.addfile(member, io.BytesIO(bytes(4)))
    assert len(tree._read_tar(archive).files) == 1  # within the limit: read
    monkeypatch.setattr(tree, "MAX_TAR_HEADER_BYTES", 1000)
    with pytest.raises(DataError) as e:
        tree._read_tar(archive)
    assert str(e.value).startswith(f"{archive}: a {kind} header of ")
    assert str(e.value).endswith("over the 1000 B any real archive needs; refused unread")


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_an_archive_that_inflates_past_any_image_data_is_refused(tmp_path, monkeypatch, mode):
    from bitvit.data import tree

    # A skipped member is inflated all the same: bzip2 and xz turn kB into TB (gzip cannot
    # pass the limit: it is deflate's own ceiling).
    archive = tmp_path / f"bomb.tar.{mode[2:]}"
    with tarfile.open(archive, mode) as tar:
        member = tarfile.TarInfo("ds/NOTES.bin")
        member.size = 8 << 20
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    monkeypatch.setattr(tree, "MIN_INFLATED_BYTES", 1 << 20)
    with pytest.raises(DataError) as e:
        tree._read_tar(archive)
    size = archive.stat().st_size
    assert str(e.value) == (
        f"{archive}: a {size:,}-byte archive inflates past "
        f"{tree.human_bytes(max(1 << 20, 1032 * size))}, more than 1032x its size, which no "
        "image data compresses to (a decompression bomb); refused unread")


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz", "w", "w:gz"])
def test_every_tar_compression_reads_as_the_folder(tmp_path, monkeypatch, mode):
    from bitvit.data.sources import read_images

    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "images")
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname="images")
    (a, _), (b, _) = read_images(folder, 16, 3), read_images(archive, 16, 3)
    assert torch.equal(a.images, b.images) and a.classes == b.classes


def test_links_in_a_folder_and_in_its_tar_read_alike(tmp_path, monkeypatch):
    from bitvit.data.sources import read_images

    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "images", ("cat", "dog", "emu"))
    first = sorted((folder / "train/cat").iterdir())[0]
    os.link(first, folder / "train/cat/hard.png")
    (folder / "train/dog/soft.png").symlink_to(f"../cat/{first.name}")
    for split in ("train", "test"):  # a class folder that is a link to another folder
        (folder / split / "emu").rename(folder / f"kept-{split}")
        (folder / split / "emu").symlink_to(f"../kept-{split}")
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="images")  # links as links
    (a, _), (b, _) = read_images(folder, 16, 3), read_images(archive, 16, 3)
    assert a.classes == b.classes == ["cat", "dog", "emu"]
    assert len(a.labels) == 4 * 3 + 2
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)

    (folder / "train/cat/loop").symlink_to(folder / "train")
    with pytest.raises(DataError, match="a link to a folder it is inside"):
        read_images(folder, 16, 3)
    (folder / "train/cat/loop").unlink()
    (folder / "train/dog/soft.png").unlink()
    (folder / "train/dog/soft.png").symlink_to(first)  # absolute: out of the archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="images")
    with pytest.raises(DataError) as e:
        read_images(archive, 16, 3)
    assert str(e.value) == (f"{archive}:images/train/dog/soft.png: a link to {first}, which "
                            "the archive does not hold")


def test_a_plain_tar_whose_first_file_is_named_bzh_is_no_bzip2(tmp_path, monkeypatch):
    from bitvit.data.sources import read_images

    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "BZhang")
    archive = tmp_path / "BZhang.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname="BZhang")
    assert archive.read_bytes().startswith(b"BZh")
    assert len(read_images(archive, 16, 3)[0].labels) == 8


def test_a_link_to_a_member_not_kept_is_one_line_naming_it(tmp_path):
    from bitvit.data import tree

    archive = tmp_path / "blobs.tar"
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with tarfile.open(archive, "w") as tar:
        blob = tarfile.TarInfo("d/blobs/0000")
        blob.size = len(png.getvalue())
        tar.addfile(blob, io.BytesIO(png.getvalue()))
        link = tarfile.TarInfo("d/train/cat/0.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../blobs/0000"
        tar.addfile(link)
    t = tree._read_tar(archive)
    with pytest.raises(DataError, match=f"^{archive}:d/blobs/0000: not kept from the archive"):
        t.files["d/train/cat/0.png"]()


def test_crafted_tar_headers_are_one_line(tmp_path, monkeypatch):
    from bitvit.data import tree

    cases = {  # tarfile raises ValueError or reads a map of any length for these
        "pax": {"GNU.sparse.size": "abc"},
        "sparse-1.0": {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                       "GNU.sparse.name": "x.png", "GNU.sparse.realsize": "10"},
    }
    for name, headers in cases.items():
        archive = tmp_path / f"{name}.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            member = tarfile.TarInfo("ds/train/a/0.png")
            member.size, member.pax_headers = 4, headers
            tar.addfile(member, io.BytesIO(bytes(4)))
        with pytest.raises(DataError) as e:
            tree._read_tar(archive)
        assert str(e.value).startswith(str(archive)) and "\n" not in str(e.value), name
    sparse = tarfile.TarInfo("ds/train/a/0.png")  # GNU's old sparse type ('S')
    sparse.type, sparse.size = tarfile.GNUTYPE_SPARSE, 0
    (tmp_path / "old.tar").write_bytes(sparse.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(DataError, match="a sparse member .* which no data set needs"):
        tree._read_tar(tmp_path / "old.tar")


def test_every_member_name_counts_against_the_memory(tmp_path, monkeypatch):
    from bitvit.data import tree

    archive = tmp_path / "names.tar.gz"  # empty members, skipped: only their names are held
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(100):
            tar.addfile(tarfile.TarInfo(f"ds/{i:04d}.txt"), io.BytesIO())
    monkeypatch.setattr(tree, "host_memory", lambda: (20_000, "a test's 20 kB"))
    with pytest.raises(DataError, match="inflate past 9.8 KiB, half the memory available"):
        tree._read_tar(archive)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path, monkeypatch):
    from bitvit.data.sources import read_images

    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "images")
    first = sorted((folder / "train/cat").iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(first.parent), b"\xe9t\xe9.png"))
    assert len(read_images(folder, 16, 3)[0].labels) == 8


def test_the_pixel_limit_may_be_raised_past_pils_own(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "300000000")
    big = tmp_path / "big.png"
    Image.new("1", (20000, 10000)).save(big)  # 200M pixels: past PIL's 179M refusal
    data = big.read_bytes()
    with pytest.raises(DataError) as e:  # within bitvit's raised limit: PIL goes on to decode
        decode_image(data[:len(data) // 2], "big.png", 16, 3)
    assert "decompression bomb" not in str(e.value) and "not a readable image" in str(e.value)


def test_images_that_would_not_fit_in_memory_decoded_are_refused_before_decoding(
        tmp_path, monkeypatch):
    from bitvit import system
    from bitvit.data import DataError
    from bitvit.data.sources import read_images

    images = write_image_folder(tmp_path / "images")  # 4 training images of each of 2 classes
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(system, "host_memory", lambda: (100_000, "a test's 100 kB"))
    with pytest.raises(DataError) as e:  # 8 x 3 x 64 x 64, twice: 196,608 bytes
        read_images(images, 64, 3)
    assert str(e.value).startswith(f"{images}: 8 images at 64x64x3 take 192.0 KiB to decode, "
                                   "more than the 97.7 KiB of memory available (a test's "
                                   "100 kB); make model.image_size smaller")
    assert read_images(images, 16, 3)[0].images.shape[-1] == 16  # 12 KiB: decoded


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse"])
def test_an_image_that_is_not_a_regular_file_within_the_limit_is_refused_unread(tmp_path,
                                                                                capsys,
                                                                                monkeypatch,
                                                                                kind):
    images = write_image_folder(tmp_path / "images")
    bad = images / "train" / "cat" / "x.png"
    expected = {"fifo": "not a regular file (a pipe); expected a PNG, JPEG or other image",
                "dev_zero": "not a regular file (a character device); expected a PNG, JPEG or "
                            "other image",
                "sparse": f"67,108,865 bytes; a PNG, JPEG or other image is at most "
                          f"67,108,864 bytes {LIMIT_NOTE}"}[kind]
    if kind == "fifo":
        os.mkfifo(bad)  # opening it to read would wait for a writer forever
    elif kind == "dev_zero":
        bad.symlink_to("/dev/zero")  # endless: read whole, it takes all memory
    else:
        monkeypatch.setenv("BITVIT_MAX_IMAGE_PIXELS", "256")  # the smallest file limit: 64 MiB
        with bad.open("wb") as f:
            f.truncate((64 << 20) + 1)  # sparse: nothing on disk
    with bounded(10, 200 << 20):
        start = time.perf_counter()
        err = one_line_error(capsys, "train", "--data", str(images), "--out", str(tmp_path / "r"),
                             "--epochs", "1", "--quiet", *TINY_16PX, "model.image_size=16",
                             "data.cache_dir=" + str(tmp_path / "cache"))
        assert err.endswith(f"{bad}: {expected}") and time.perf_counter() - start < 5
        with pytest.raises(DataError, match="expected a PNG, JPEG or other image|is at most"):
            decode_image(bad, str(bad), 16, 3)  # a path given to the library: the same


def write_ico_holding(path: Path, png: bytes) -> Path:
    """An ICO of one entry (its one-byte width and height: 0, meaning 256) that is ``png``."""
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32,
                                                           len(png), 22)
    path.write_bytes(directory + png)
    return path


def test_an_ico_is_refused_before_it_decodes_the_image_inside(tiny_run, tmp_path, capsys,
                                                              monkeypatch):
    png = io.BytesIO()
    Image.new("1", (5000, 5000)).save(png, "PNG")  # 25 MP, 3 KB; PIL's ICO decodes it on open
    ico = write_ico_holding(tmp_path / "icon.png", png.getvalue())
    decoded = record_decoded_sizes(monkeypatch)
    err = one_line_error(capsys, "predict", str(tiny_run["export"]), str(ico), "--device", "cpu")
    assert err.endswith(f"{ico}: not a readable image (not a PNG, JPEG, BMP, GIF, TIFF, WEBP or "
                        "PPM image that PIL can open)")
    assert decoded == []


def test_a_tiff_that_pil_logs_about_is_still_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    tags = [struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0] for i in range(count)]
    struct.pack_into("<H", data, ifd + 2 + 12 * tags.index(277) + 8, 2048)  # SamplesPerPixel
    tiff = tmp_path / "many-samples.tif"
    tiff.write_bytes(data)
    # As under the bitvit command, no handlers: logging's last resort prints to stderr.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    # PIL logs "More samples per pixel than can be decoded" as it refuses: folded into the line.
    err = one_line_error(capsys, "predict", str(tiny_run["export"]), str(tiff), "--device", "cpu")
    assert f"{tiff}: not a readable image (" in err
    assert err.endswith("; PIL: More samples per pixel than can be decoded: 2048)")


# --- predict goes on past unreadable images ---------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    for i, path in enumerate(write_pngs(folder, 3, 20, seed=1)):
        path.rename(folder / f"good{i}.png")
    data = (folder / "good0.png").read_bytes()
    (folder / "bad0.png").write_bytes(data[:len(data) // 2])  # truncated
    (folder / "bad1.png").write_text("not an image\n")
    return folder


def test_predict_reports_each_unreadable_image_and_predicts_the_rest(tiny_run, mixed_folder,
                                                                     capsys):
    capsys.readouterr()
    assert main(["predict", str(tiny_run["export"]), str(mixed_folder), "--device", "cpu",
                 "--top-k", "1"]) == 2
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err.splitlines()
    assert [line.split(":")[0] for line in out] == [str(mixed_folder / f"good{i}.png")
                                                    for i in range(3)]
    assert len(err) == 2 and all(line.startswith("bitvit predict: error: ") for line in err)
    assert f"{mixed_folder / 'bad0.png'}: not a readable image" in err[0]
    assert f"{mixed_folder / 'bad1.png'}: not a readable image" in err[1]


def test_predict_json_lists_the_unreadable_images_too(tiny_run, mixed_folder, tmp_path, capsys):
    capsys.readouterr()
    missing = tmp_path / "missing.png"
    assert main(["predict", str(tiny_run["export"]), str(mixed_folder), str(missing), "--json",
                 "--device", "cpu", "--batch-size", "2"]) == 2
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["file"]).name for r in records] == [
        "bad0.png", "bad1.png", "good0.png", "good1.png", "good2.png", "missing.png"]
    assert [("error" in r) for r in records] == [True, True, False, False, False, True]
    assert all(len(r["predictions"]) == 2 for r in records if "error" not in r)
    assert len(captured.err.splitlines()) == 3
    assert f"{missing}: no such image file or folder" in records[-1]["error"]


def test_every_config_and_study_in_the_repository_is_within_the_limit():
    """The limit is far above any real file: every config and study in the repository reads."""
    for path in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("studies/*.yaml")]:
        assert path.stat().st_size < 2 ** 20 // 10, path
        assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert os.path.getsize(ROOT / "configs/paper.yaml") > 0


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    from bitvit.data import DataError
    from bitvit.data.folder import MAX_JPEG_SCANS, decode_image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(buf, "JPEG",
                                                                      progressive=True)
    normal = buf.getvalue()
    assert 1 < normal.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert decode_image(normal, "normal.jpg", 32, 3).shape == (3, 32, 32)
    # Each scan is a pass over the whole image: repeat the last one past the limit (a crafted
    # 16 MP file of 100,000 scans took minutes to decode).
    last = normal.rindex(b"\xff\xda")
    bomb = normal[:last] + normal[last:-2] * (MAX_JPEG_SCANS + 1) + normal[-2:]
    with pytest.raises(DataError, match=r"bomb.jpg: a JPEG of 1\d\d scans; bitvit decodes at "
                                        rf"most {MAX_JPEG_SCANS}"):
        decode_image(bomb, "bomb.jpg", 32, 3)


# --- weights files are read whole: one larger than the memory is refused unread -------------

MIB = 1 << 20


@pytest.fixture
def twenty_mib(monkeypatch):
    """This process sees 20 MiB of memory available (for the weights readers' check only)."""
    from bitvit import system

    monkeypatch.setattr(system, "host_memory", lambda: (20 * MIB, "test"))


def with_sparse_tensor(src: Path, dst: Path, size: int = 30 * MIB) -> Path:
    """A copy of the safetensors file ``src`` with one more tensor of ``size`` bytes stored as a
    hole: the file claims the size (as a hostile one may) and takes no disk."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    header["zz_hole"] = {"dtype": "U8", "shape": [size], "data_offsets": [len(body),
                                                                          len(body) + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
        f.truncate(8 + len(text) + len(body) + size)
    return dst


def test_a_sparse_checkpoint_export_or_pretrained_file_is_refused_unread(tiny_run, tmp_path,
                                                                         twenty_mib, capsys):
    """A file claiming more bytes than the memory holds would be read until the kernel kills
    the process: each reader refuses it first, naming it (training checkpoint, export, a
    pretrained safetensors file)."""
    from safetensors.torch import save_file

    why = "30.0 MiB to read, more than the 20.0 MiB of memory available (test)"
    checkpoint = with_sparse_tensor(tiny_run["run"] / "last/model.safetensors",
                                    tmp_path / "loose/model.safetensors")
    assert one_line_error(capsys, "eval", str(checkpoint)) == (
        f"bitvit eval: error: {checkpoint}: {why}")
    export = with_sparse_tensor(tiny_run["export"], tmp_path / "export.safetensors")
    assert one_line_error(capsys, "predict", str(export), str(tiny_run["images"])) == (
        f"bitvit predict: error: {export}: {why}")
    save_file({"x": torch.zeros(4)}, str(tmp_path / "plain.safetensors"))
    timm = with_sparse_tensor(tmp_path / "plain.safetensors", tmp_path / "timm.safetensors")
    assert one_line_error(capsys, "train", "--init-from", str(timm), "--data",
                          str(tiny_run["images"]), "--out", str(tmp_path / "run"),
                          *TINY_16PX) == f"bitvit train: error: {timm}: {why}"


def test_a_training_state_that_inflates_past_the_memory_is_refused_unread(tiny_run, tmp_path,
                                                                          twenty_mib, capsys):
    """state.pt is a zip: a small one can declare entries of any size unpacked."""
    import zipfile

    from bitvit.files import stored_bytes

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    state = run / "last/state.pt"
    state.unlink()
    (run / "last/checksums.json").unlink()  # as a checkpoint from before the checksums
    with zipfile.ZipFile(state, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(30 * MIB))
    assert state.stat().st_size < MIB and stored_bytes(state) == 30 * MIB
    why = "30.0 MiB to read, more than the 20.0 MiB of memory available (test)"
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert err == f"bitvit train: error: {state}: {why}"
    # The same zip as a Hugging Face folder's torch weights.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text(json.dumps({
        "model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 16, "patch_size": 8, "num_channels": 3}))
    bomb = shutil.copy(state, tmp_path / "hf/pytorch_model.bin")
    assert one_line_error(capsys, "train", "--init-from", str(tmp_path / "hf"), "--data",
                          str(tiny_run["images"]), "--out", str(tmp_path / "new"),
                          *TINY_16PX) == f"bitvit train: error: {bomb}: {why}"


def test_stored_bytes_reads_no_zip_directory_past_its_bound_and_never_raises_on_odd_zips(
        tmp_path):
    """The guard must not fill memory itself (a sparse zip whose end record claims a 64 MiB
    directory is refused from that record), nor fail as a traceback on a zip that zipfile
    cannot read (an entry of extract version 9.9 counts its file size), nor wait on a FIFO."""
    import zipfile

    from bitvit.files import FileRefused, stored_bytes

    sparse = tmp_path / "sparse.pt"
    with sparse.open("wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(64 * MIB)
        f.seek(64 * MIB)
        f.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 64 * MIB, 0, 0))
    with pytest.raises(FileRefused, match=r"sparse\.pt: a zip whose directory claims "
                                          r"67,108,864 bytes; a weights file's is at most"):
        stored_bytes(sparse)
    odd = tmp_path / "odd.pt"
    with zipfile.ZipFile(odd, "w") as archive:
        archive.writestr("data", b"x" * 100)
    data = bytearray(odd.read_bytes())
    at = data.rfind(b"PK\x01\x02")
    data[at + 6:at + 8] = struct.pack("<H", 99)  # version needed to extract: 9.9
    odd.write_bytes(bytes(data))
    assert stored_bytes(odd) == len(data)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileRefused, match="not a regular file"):
        stored_bytes(tmp_path / "fifo")
