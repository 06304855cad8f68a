"""One owner of the run folder: the lock, restarts that move aside instead of deleting, and OS
failures (disk full, read-only) as one line with the last checkpoint intact. Everything goes
through the command line, on a small synthetic image folder and a tiny model."""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError

import bitvit.deploy.export
import bitvit.training.checkpoint
from bitvit import files
from bitvit.cli import main
from bitvit.training import rundir

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "configs/paper.yaml")
TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8",
        "model.num_classes=2", "train.batch_size=20", "train.seed=0"]
ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


class Killed(BaseException):
    """Stands in for SIGKILL at a chosen point (nothing in train() catches a BaseException)."""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ PNGs: 2 classes, 40 + 10 images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for k, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8) + 100 * k
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path_factory.getbasetemp() / "rundir-cache"))


def train_args(images: Path, out: Path, epochs: int = 2) -> list[str]:
    return ["train", "--config", PAPER, "--data", str(images), "--out", str(out), "--quiet",
            "--epochs", str(epochs), *TINY]


def rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the seconds column (wall time differs from run to run)."""
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The uninterrupted 2-epoch run every recovered run must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITVIT_CACHE", str(tmp_path_factory.getbasetemp() / "rundir-cache"))
        assert main(train_args(images, run)) == 0
    return run


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob("*") if p.name.endswith((".tmp", ".old")))


def epoch_of(folder: Path) -> int:
    return torch.load(folder / "state.pt", weights_only=True)["epoch"]


# --- the lock ---------------------------------------------------------------------------------

# `bitvit train` in a subprocess that waits, after its first epoch's row, for a file to appear:
# the test holds it there, inside the run, as long as it needs.
HELD_TRAIN = """
import sys, time
from pathlib import Path
import importlib
t = importlib.import_module("bitvit.training.rundir")
real, go = t.plot_curves, Path(sys.argv[1])
def plot_curves(*a, **k):
    real(*a, **k)
    deadline = time.time() + 120
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)
t.plot_curves = plot_curves
from bitvit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_training_into_a_locked_folder_is_refused_at_once(images, reference, tmp_path):
    run, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, "-c", HELD_TRAIN, str(go),
                              *train_args(images, run)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.csv").exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        assert rundir.locked_by_other(run)
        start = time.time()
        second = subprocess.run([sys.executable, "-m", "bitvit", *train_args(images, run)],
                                env=env, capture_output=True, text=True, timeout=120)
        refused_after = time.time() - start
    finally:
        go.touch()
        out, err = first.communicate(timeout=120)
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr == (f"bitvit train: error: {run}: in use by another bitvit process "
                             f"(pid {first.pid}); wait for it to end or choose another folder\n")
    assert refused_after < 30  # before reading any data or training
    # The first run finished intact, as if alone.
    assert first.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["status"] == "finished"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["pid"] == first.pid
    assert rows(run) == rows(reference) and epoch_of(run / "last") == 2
    assert not rundir.locked_by_other(run)  # released with the process


# --- restarts move aside; recoverable runs resume ----------------------------------------------


@pytest.mark.parametrize("resume", [False, True, "."])
def test_rerun_after_a_kill_in_the_first_checkpoint_starts_again(images, reference, tmp_path,
                                                                  monkeypatch, capsys, resume):
    train_module = importlib.import_module("bitvit.training.loop")
    run = tmp_path / "run"
    real_swap = train_module.swap_folder

    def killed_while_writing(target, write):
        (target.with_name(f".{target.name}.tmp")).mkdir()
        (target.with_name(f".{target.name}.tmp") / "model.safetensors").write_bytes(b"half")
        raise Killed

    monkeypatch.setattr(train_module, "swap_folder", killed_while_writing)
    with pytest.raises(Killed):
        main(train_args(images, run))
    monkeypatch.setattr(train_module, "swap_folder", real_swap)
    assert len(rows(run)) == 1 and (run / ".last.tmp").is_dir() and not (run / "last").exists()
    old_rows = rows(run)

    capsys.readouterr()
    if resume == ".":  # from inside the folder: "." has no name to put a sibling beside
        monkeypatch.chdir(run)
        assert main(["train", "--resume", ".", "--quiet"]) == 0
        monkeypatch.chdir(tmp_path)
    elif resume:  # --resume, as the user may reach for it: nothing to continue, so it restarts
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
    else:  # the original command, as the user reruns it
        assert main(train_args(images, run)) == 0
    err = capsys.readouterr().err
    [aside] = tmp_path.glob("run.restart-*")
    shown = "." if resume == "." else run
    assert err == (f"bitvit train: {shown} held a run without a checkpoint; moved it to {aside} "
                   "and starting again\n")
    assert rows(run) == rows(reference)
    assert rows(aside) == old_rows and (aside / ".last.tmp/model.safetensors").is_file()
    assert temporaries(run) == []
    # A folder with a checkpoint is another matter: it is resumed, never restarted.
    assert "already holds a run; pass --resume" in one_line_error(capsys,
                                                                 train_args(images, run))


def test_a_folder_of_other_files_is_refused_not_moved(images, tmp_path, capsys):
    # A user's project with its own config.yaml is no run killed in its first epoch.
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "notes.txt").write_text("notes")
    err = one_line_error(capsys, train_args(images, project))
    assert err.endswith(f"{project}: holds files that are not a bitvit run (config.yaml...); "
                        "choose a new or empty --out")
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "notes.txt"]
    assert (project / "config.yaml").read_text() == "mine: true\n"
    assert list(tmp_path.glob("project.restart-*")) == []


def write_sweep(path: Path, images: Path, out: Path, seeds: list[int]) -> Path:
    path.write_text(yaml.safe_dump({
        "base": PAPER, "out": str(out),
        "overrides": [*TINY[:-1], "train.epochs=2", f"data.path={images}"],
        "grid": {"train.seed": seeds}}))
    return path


def test_a_sweep_goes_on_past_a_run_whose_teacher_is_missing(images, tmp_path, capsys):
    # One at a time as with --parallel: the run fails, the others train, the end says so.
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": PAPER, "out": str(tmp_path / "out"),
        "overrides": [*TINY[:-1], "train.epochs=1", f"data.path={images}"],
        "grid": {"train.distill.teacher": [str(tmp_path / "no-teacher"), None]}}))
    assert main(["sweep", str(sweep)]) == 2
    out, err = capsys.readouterr()
    assert "FAILED" in out and "1 run(s) failed" in err
    [trained] = [d for d in (tmp_path / "out").iterdir() if d.is_dir() and (d / "last").is_dir()]
    assert "teacher=none" in trained.name and len(rows(trained)) == 1


def test_sweep_resumes_a_folder_left_with_only_last_old(images, reference, tmp_path,
                                                        monkeypatch, capsys):
    train_module = importlib.import_module("bitvit.training.loop")
    sweep = write_sweep(tmp_path / "s.yaml", images, tmp_path / "out", [0])
    run = tmp_path / "out/seed=0"
    real_swap = train_module.swap_folder

    def killed_between_the_renames(target, write):
        if target.name == "last" and (target / "state.pt").is_file():  # epoch 2
            real_swap(target.with_name("scratch"), write)
            target.rename(target.with_name(".last.old"))
            target.with_name("scratch").rename(target.with_name(".last.tmp"))
            raise Killed
        real_swap(target, write)

    monkeypatch.setattr(train_module, "swap_folder", killed_between_the_renames)
    with pytest.raises(Killed):
        main(["sweep", str(sweep)])
    monkeypatch.setattr(train_module, "swap_folder", real_swap)
    assert not (run / "last").exists() and epoch_of(run / ".last.old") == 1

    capsys.readouterr()
    assert main(["sweep", str(sweep)]) == 0
    assert f"resume    {run}" in capsys.readouterr().out
    assert rows(run) == rows(reference) and epoch_of(run / "last") == 2
    history = json.loads((run / "run.json").read_text())["resumed_from"]
    assert len(history) == 1 and "resumed_from" not in history[0]
    assert temporaries(run) == [] and list(tmp_path.glob("out/*.restart-*")) == []


def test_sweep_moves_a_folder_it_restarts_aside(images, reference, tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s.yaml", images, tmp_path / "out", [0, 1])
    stale = tmp_path / "out/seed=0"
    # Killed in its first epoch's checkpoint: a row, a half-written .last.tmp, no last/.
    assert main(train_args(images, stale, epochs=2)) == 0
    with (stale / "metrics.csv").open() as f:
        first_row = f.read().splitlines()[:2]
    (stale / "metrics.csv").write_text("\n".join(first_row) + "\n")
    (stale / "last").rename(stale / ".last.tmp")
    (stale / ".last.tmp/state.pt").unlink()
    (stale / "best").mkdir()  # anything else it held moves too

    capsys.readouterr()
    # Two at once: each `bitvit train` child trains under the lock the sweep took for it.
    assert main(["sweep", str(sweep), "--parallel", "2"]) == 0
    assert f"restart   {stale}" in capsys.readouterr().out
    [aside] = tmp_path.glob("out/seed=0.restart-*")
    assert len(rows(aside)) == 1 and (aside / ".last.tmp/model.safetensors").is_file()
    assert (aside / "best").is_dir()
    assert rows(stale) == rows(reference)
    assert json.loads((tmp_path / "out/seed=1/run.json").read_text())["status"] == "finished"
    assert not rundir.locked_by_other(stale)


# --- OS failures: one line, run marked failed, nothing half-written, resume works ----------------


def test_disk_full_at_epoch_2_checkpoint(images, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save, calls = bitvit.training.checkpoint.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # epoch 2's last/model.safetensors
            Path(path).write_bytes(b"half a file")
            raise SafetensorError(ENOSPC)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(bitvit.training.checkpoint, "save_file", save_file)
    err = one_line_error(capsys, train_args(images, run))
    assert err == f"bitvit train: error: {run}/last/model.safetensors: No space left on device"
    check_failed_run_resumes(run, reference, "No space left on device", monkeypatch, capsys)


def test_read_only_folder_at_epoch_2(images, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_write, calls = files.write_file, []

    def write_file(path, write):
        if path.name.startswith(".metrics.csv."):  # its temporary
            calls.append(path)
            if len(calls) == 2:  # epoch 2's row: the folder went read-only
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_write(path, write)

    monkeypatch.setattr(files, "write_file", write_file)
    err = one_line_error(capsys, train_args(images, run))
    assert err == f"bitvit train: error: {run}/metrics.csv: Read-only file system"
    check_failed_run_resumes(run, reference, "Read-only file system", monkeypatch, capsys)


def check_failed_run_resumes(run: Path, reference: Path, reason: str, monkeypatch,
                             capsys) -> None:
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and reason in info["error"]
    assert temporaries(run) == [] and not any(p.suffix == ".tmp" for p in run.iterdir())
    assert epoch_of(run / "last") == 1 and len(rows(run)) >= 1
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert rows(run) == rows(reference) and epoch_of(run / "last") == 2


def test_export_onto_a_full_disk(reference, tmp_path, monkeypatch, capsys):
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise SafetensorError(ENOSPC)

    monkeypatch.setattr(bitvit.deploy.export, "save_file", save_file)
    out = tmp_path / "exported/model.safetensors"
    err = one_line_error(capsys, ["export", str(reference), "--out", str(out)])
    assert err == f"bitvit export: error: {out}: No space left on device"
    assert list(out.parent.iterdir()) == []


def test_resume_history_is_flat_and_complete():
    # A run.json as the nesting code wrote it after three invocations: each earlier record
    # held the history before it.
    r0 = {"start": "t0", "wall_seconds": 1.0}
    r1 = {"start": "t1", "wall_seconds": 2.0, "resumed_from": [r0]}
    current = {"start": "t2", "wall_seconds": 3.0, "resumed_from": [r0, r1]}
    history = rundir.resume_history(current)
    assert [r["start"] for r in history] == ["t0", "t1", "t2"]
    assert all("resumed_from" not in r for r in history)
    assert "resumed_from" in current and "resumed_from" in r1  # the inputs are not changed
    again = rundir.resume_history({"start": "t3", "resumed_from": history})
    assert [r["start"] for r in again] == ["t0", "t1", "t2", "t3"]
    assert rundir.resume_history({"start": "t0"}) == [{"start": "t0"}]


def test_atomic_writes_take_the_users_permissions_even_from_private_writers(tmp_path):
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        private = files.atomic_file(tmp_path / "x.bin", lambda p: (p.touch(mode=0o600), None))
        weights = files.atomic_file(tmp_path / "w.safetensors",
                                    lambda p: save_file({"w": torch.zeros(2)}, str(p)))
    finally:
        os.umask(old)
    assert (private.stat().st_mode & 0o777) == 0o644
    assert (weights.stat().st_mode & 0o777) == 0o644


def test_an_atomic_write_syncs_the_file_then_its_rename(tmp_path, monkeypatch):
    from bitvit import files

    target = tmp_path / "config.yaml"
    target.write_text("old")
    synced: list[tuple[str, str]] = []  # (what, the target's content then)
    real_sync = files.sync_path

    def sync(path: Path) -> None:
        synced.append((path.name, target.read_text()))
        real_sync(path)

    monkeypatch.setattr(files, "sync_path", sync)
    files.write_text(target, "new")
    assert synced[0][1] == "old" and synced[1:] == [(tmp_path.name, "new")]


def test_a_swapped_checkpoint_reaches_the_disk_before_the_old_one_goes(tmp_path, monkeypatch):
    from bitvit import files
    from bitvit.training import rundir

    target = tmp_path / "last"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    synced: list[tuple[str, bool]] = []  # (name, whether the previous folder still existed)
    real_sync = files.sync_path

    def sync(path: Path) -> None:
        synced.append((path.name, rundir.displaced(target).exists() or target.exists()))
        real_sync(path)

    monkeypatch.setattr(files, "sync_path", sync)

    def write(folder: Path) -> None:
        for name in ("model.safetensors", "state.pt"):
            (folder / name).write_bytes(b"new")

    rundir.swap_folder(target, write)
    assert sorted(synced[:2]) == [("model.safetensors", True), ("state.pt", True)]
    assert synced[2:] == [(".last.tmp", True), (tmp_path.name, True)]  # files, folder, rename
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert not rundir.displaced(target).exists()
