"""The run folder: its paths, its lock, and every write into it, in one place.

A run folder holds ``metrics.csv``, ``config.yaml``, ``run.json``, ``curves.png``, ``last/`` and
``best/`` checkpoints, and ``.lock``. One process owns it at a time: `locked` holds an advisory
``flock`` on ``.lock`` (released by the OS when the process dies). Files are written by
`atomic_file` (temporary file, then rename) and checkpoint folders by `swap_folder`; a failed
write removes its temporary and raises `OSError` naming the file. Nothing here deletes a run:
a folder that must start again is moved aside (`move_aside`).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from bitvit import files
from bitvit.files import atomic_file, write_text

METRICS = "metrics.csv"
CONFIG = "config.yaml"
RUN_JSON = "run.json"
CURVES = "curves.png"
LAST = "last"
BEST = "best"
LOCK = ".lock"
TRAIN_LOG = "train.log"  # a sweep's child writes its output here, before the run starts
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"  # optimizer, scheduler, RNG and epoch, beside MODEL_FILE
# A distillation teacher's logits for the training split, when they are the same every epoch
# (no augmentation); keyed by the teacher file's and the training images' sha256.
TEACHER_LOGITS = "teacher_logits.safetensors"
CHECKSUMS = "checksums.json"  # the sha256 of MODEL_FILE and STATE_FILE, written with them
# metrics.csv is a row per epoch; far below this even for thousands of epochs.
MAX_METRICS_BYTES = 16 << 20
# What a run writes.
RUN_ENTRIES = (METRICS, CONFIG, RUN_JSON, CURVES, LAST, BEST, f".{LAST}.tmp", f".{LAST}.old",
               f".{BEST}.tmp", f".{BEST}.old", TEACHER_LOGITS)
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"]
VAL_COLUMNS = ["val_loss", "val_acc"]
# The model in eval mode (no dropout, no augmentation) on a fixed class-balanced subset of the
# training split: unlike train_loss/train_acc, a running average in train mode, it compares
# with test_loss/test_acc. Last in the row, so folders written before these columns still read.
TRAIN_EVAL_COLUMNS = ["train_eval_loss", "train_eval_acc"]


def metric_columns(with_val: bool, rows: list[dict[str, float]]) -> list[str]:
    """metrics.csv's columns; a run resumed from a folder written before the train-eval columns
    keeps its columns."""
    columns = METRIC_COLUMNS + (VAL_COLUMNS if with_val else [])
    return columns + (TRAIN_EVAL_COLUMNS if not rows or TRAIN_EVAL_COLUMNS[0] in rows[0] else [])


# Inherited from a `bitvit sweep` parent: the descriptor of the run folder's lock it holds.
LOCK_FD_ENV = "BITVIT_RUN_LOCK_FD"


class RunBusyError(ValueError):
    """Another process holds the run folder's lock; the message is one line."""


class RunFolderError(ValueError):
    """A file of the run folder bitvit cannot use (a garbage metrics.csv, say); one line naming
    the file and, for metrics.csv, the row."""


def displaced(folder: Path) -> Path:
    """Where a checkpoint folder waits while its replacement is renamed into place.

    A process killed between the two renames of `swap_folder` leaves only this folder;
    readers fall back to it (`checkpoint_folder`).
    """
    if not folder.name:  # "." (a checkpoint file named without a folder) has no name to take
        folder = folder.absolute()
    return folder.with_name(f".{folder.name}.old")


def checkpoint_folder(folder: Path) -> Path:
    """``folder``, or the complete previous folder that a kill between the two renames of
    `swap_folder` leaves under its `displaced` name. Read only: the next save replaces both."""
    old = displaced(folder)
    if not folder.exists() and all((old / f).is_file() for f in (MODEL_FILE, STATE_FILE)):
        return old
    return folder


def swap_folder(target: Path, write: Callable[[Path], Any]) -> None:
    """Fill a temporary folder with ``write(folder)``, then swap it in for ``target``.

    ``target`` is complete before and after; a failure while writing removes the temporary
    folder, leaves ``target`` as it was and raises OSError naming the file under ``target``.
    Its files and the renames reach the disk before the previous folder is removed, so that a
    power loss, not only a kill, leaves one complete checkpoint.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    old = displaced(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for f in tmp.iterdir():
            files.sync_path(f)
        files.sync_path(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and str(e.filename).startswith(str(tmp)):
            e.filename = str(target) + str(e.filename)[len(str(tmp)):]
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    files.sync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# What a run folder holds
# ---------------------------------------------------------------------------------------------


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``--resume`` can continue the run: a complete last/ (or its `displaced` copy)."""
    last = checkpoint_folder(Path(run_dir) / LAST)
    return all((last / f).is_file() for f in (MODEL_FILE, STATE_FILE))


# What makes a folder a run's: its record (written first) or a checkpoint. A config.yaml or a
# metrics.csv alone may be a user's own file.
RUN_MARKS = (RUN_JSON, LAST, BEST, f".{LAST}.tmp", f".{LAST}.old", f".{BEST}.tmp",
             f".{BEST}.old")


def holds_run(run_dir: Path) -> bool:
    """Whether the folder holds a run (a lock file alone is not one)."""
    return any((Path(run_dir) / name).exists() for name in RUN_MARKS)


def foreign_entry(run_dir: Path) -> str | None:
    """The first entry of a folder that holds no run but other files (a new run would mix with
    them, and a restart would move them aside); None for a run's folder, an empty or a new
    one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or holds_run(run_dir):
        return None
    return next((p.name for p in sorted(run_dir.iterdir()) if p.name not in (LOCK, TRAIN_LOG)),
                None)


def is_empty(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return not run_dir.exists() or all(p.name == LOCK for p in run_dir.iterdir())


def move_aside(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` but its lock to a new sibling ``NAME.restart-TIME/``, so
    that the run can start again in ``run_dir`` without deleting anything; return that folder."""
    run_dir = Path(run_dir).resolve()  # "." or ".." has no name to put a sibling beside
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.restart-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.restart-{stamp}-{n}")
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK:
            entry.rename(aside / entry.name)
    return aside


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv (a run folder's, or the file); [] when there is none.
    `RunFolderError` names the file and the row of anything but a header with an epoch column
    and rows of numbers, one per column."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    try:
        text = files.read_limited(path, "metrics.csv", MAX_METRICS_BYTES).decode()
    except files.FileRefused as e:
        raise RunFolderError(str(e)) from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not a text file; expected the metrics.csv bitvit train "
                             "writes") from None
    try:
        return _parse_metrics(path, list(csv.reader(text.splitlines())))
    except csv.Error as e:  # NUL bytes, broken quoting
        raise RunFolderError(f"{path}: not a CSV file ({e})") from None


def _parse_metrics(path: Path, lines: list[list[str]]) -> list[dict[str, float]]:
    if not lines:
        return []
    header, out = lines[0], []
    if "epoch" not in header:
        raise RunFolderError(f"{path}: row 1 (the header) has no epoch column; expected the "
                             f"columns bitvit train writes ({', '.join(METRIC_COLUMNS)}, ...)")
    for n, row in enumerate(lines[1:], start=2):
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise RunFolderError(f"{path}: row {n} has {len(row)} fields; the header has "
                                 f"{len(header)} ({', '.join(header)})")
        values = {}
        for key, value in zip(header, row, strict=True):
            try:
                values[key] = float(value)
            except ValueError:
                raise RunFolderError(f"{path}: row {n}: {key}={value[:40]!r} is not a "
                                     "number") from None
        out.append(values)
    return out


def write_metrics(path: Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: int(row[k]) if k == "epoch" else f"{row[k]:.6g}"
                                 for k in columns})

    atomic_file(path, write)


def plot_curves(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """curves.png: loss and accuracy per epoch of each split the rows hold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style, label in (("train", "-", "train (running, train mode)"),
                                ("train_eval", "-.", "train (eval)"), ("test", "--", "test"),
                                ("val", ":", "val")):
        if rows and f"{split}_loss" in rows[0]:
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], style, label=label)
            ax_acc.plot(epochs, [r[f"{split}_acc"] for r in rows], style, label=label)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def read_info(run_dir: Path) -> dict[str, Any]:
    """run.json, or {} when it is missing, unreadable, not a regular file or oversized."""
    try:
        info = files.parse_json(files.read_limited(Path(run_dir) / RUN_JSON, "run.json"))
    except (OSError, ValueError):  # json.JSONDecodeError, FileRefused, UnicodeDecodeError
        return {}
    return info if isinstance(info, dict) else {}


def resume_history(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The run.json "resumed_from" list for a run resumed from ``previous`` (its run.json):
    every earlier invocation once, oldest first, none holding a history of its own. (Files
    written before this nested each record's history inside it, which grew with every resume;
    their top-level list is already complete, so dropping the nested copies flattens them.)"""
    earlier = [r for r in previous.get("resumed_from", []) if isinstance(r, dict)]
    return [{k: v for k, v in r.items() if k != "resumed_from"} for r in [*earlier, previous]]


def write_info(run_dir: Path, info: dict[str, Any]) -> None:
    write_text(Path(run_dir) / RUN_JSON, json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

# Lock files this process holds: path -> [descriptor, depth, inherited]. Re-entrant, so that a
# sweep holding a run's lock can call train() on it in the same process.
_held: dict[Path, list[Any]] = {}


def _inherited(path: Path) -> int | None:
    """The lock descriptor a `bitvit sweep` parent passed down for ``path``, if any."""
    try:
        fd = int(os.environ.get(LOCK_FD_ENV, ""))
        mine, theirs = os.fstat(fd), path.stat()
    except (ValueError, OSError):
        return None
    return fd if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) else None


def holder(run_dir: Path) -> str:
    """The pid written into the lock file by its holder ("?" when unknown)."""
    try:
        return (Path(run_dir) / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def acquire(run_dir: Path) -> int:
    """Take the run folder's lock (creating the folder); return its descriptor. Raises
    `RunBusyError` naming the folder and the holder's pid if another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK).resolve()
    if path in _held:
        _held[path][1] += 1
        return _held[path][0]
    fd = _inherited(path)
    inherited = fd is not None
    if fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not inherited:
            os.close(fd)
        raise RunBusyError(f"{run_dir}: in use by another bitvit process (pid {holder(run_dir)}); "
                           "wait for it to end or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = [fd, 1, inherited]
    return fd


def release(run_dir: Path) -> None:
    path = (Path(run_dir) / LOCK).resolve()
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        if not entry[2]:  # an inherited lock is the parent's to release
            fcntl.flock(entry[0], fcntl.LOCK_UN)
        os.close(entry[0])


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[int]:
    """Hold the run folder's lock for the block (see `acquire`); yields its descriptor."""
    fd = acquire(run_dir)
    try:
        yield fd
    finally:
        release(run_dir)


def locked_by_other(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock (a live run)."""
    path = Path(run_dir) / LOCK
    if not path.is_file() or path.resolve() in _held:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one
    return False
