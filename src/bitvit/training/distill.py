"""Knowledge distillation: the teacher a run learns from, checked against the student, and its
logits for the images the student sees.

``train.distill.teacher`` (`bitvit.training.config.DistillConfig`) names a run folder, a
checkpoint folder or file, or an exported ``.safetensors`` model. Training reads run folders and
checkpoints itself (`load_checkpoint_teacher`); reading an export needs the inference engine of
`bitvit.deploy`, a layer above training, so the loader is handed in from above: ``bitvit train``
and ``bitvit sweep`` pass `bitvit.deploy.teacher.load_teacher`, which reads both, and so may a
caller of `bitvit.train` (``teacher_loader=bitvit.load_teacher``).

Set-up runs in two steps, so that a mismatched teacher fails before the data is read:
`load_teacher` (load, hash, check the classes, image size and channels against the student's
config) and `set_up` (the teacher's test accuracy on the student's test split, and its logits).
The teacher runs in eval mode, without gradients, in fp32, on the images the student sees
after augmentation, normalized with the teacher's own mean and std. Without augmentation every
epoch sees the same images: the logits for the whole training split are computed once (each
process its share under ``torchrun``), kept in ``RUN/teacher_logits.safetensors`` keyed by the
teacher file's and the training images' sha256, and looked up by the batch's positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitvit import files
from bitvit.data import DataSplits, augments, normalize
from bitvit.nn.methods import FULL_PRECISION
from bitvit.training import rundir
from bitvit.training.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_metadata,
    resolve_checkpoint,
)
from bitvit.training.config import Config, ConfigError
from bitvit.training.evaluation import predict_logits
from bitvit.training.losses import Batch, TeacherLogits

KEY = "train.distill.teacher"
EXPORT_FORMAT = "bitvit-export"  # bitvit.deploy.export's files, read by an injected loader


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Teacher:
    """A model to distil from, as a loader gives it."""

    model: nn.Module  # logits for images normalized with mean and std; eval mode
    file: Path  # the weights file read (hashed: sha256)
    classes: list[str]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    quantization: str | None  # e.g. "b158 all act8"; None for a full-precision teacher
    format: str  # checkpoint | export
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = file_sha256(self.file)


TeacherLoader = Callable[[str], Teacher]


def quantization_of(config: Config) -> str | None:
    """A quantized model's method, layers and activation bits; None for full precision."""
    q = config.quant
    if q.method == FULL_PRECISION or q.where == "none":
        return None
    return f"{q.method} {q.where} " + ("act-fp" if q.act_bits is None else f"act{q.act_bits}")


def teacher_from_checkpoint(ckpt: Checkpoint) -> Teacher:
    mean, std = ckpt.config.data.mean, ckpt.config.data.std
    if isinstance(mean, str) or isinstance(std, str):
        raise ConfigError(f"{ckpt.path}: its config has data.mean={mean!r}, data.std={std!r}; a "
                          "teacher needs the numbers it was trained with (a trained run's have)")
    m = ckpt.config.model
    return Teacher(ckpt.model, ckpt.path, list(ckpt.classes), m.image_size, m.in_channels,
                   tuple(mean), tuple(std), quantization_of(ckpt.config), "checkpoint")


def load_checkpoint_teacher(path: str | Path) -> Teacher:
    """A run folder (its ``last/``), checkpoint folder or checkpoint file as a teacher: the
    loader training uses unless one is handed in."""
    file = resolve_checkpoint(path)
    if read_metadata(file).get("format") == EXPORT_FORMAT:
        raise ConfigError(f"{file}: an exported model; training reads run folders and "
                          "checkpoints, exports through bitvit.deploy: use `bitvit train "
                          "--teacher`, or bitvit.train(..., teacher_loader=bitvit.load_teacher)")
    return teacher_from_checkpoint(load_checkpoint(file))


def load_teacher(config: Config, loader: TeacherLoader | None = None) -> Teacher | None:
    """The teacher ``train.distill.teacher`` names (None when it is null), read by ``loader``
    (default `load_checkpoint_teacher`) and checked against the student's config and its
    recorded sha256; a one-line `ConfigError` naming both sides for anything that does not fit."""
    d = config.train.distill
    if d.teacher is None:
        return None
    # A loader builds a model, which draws on the global RNG: the student's init must not move.
    with torch.random.fork_rng(devices=[]):
        try:
            teacher = (loader or load_checkpoint_teacher)(d.teacher)
        except ValueError as e:  # CheckpointError, ExportError, ConfigError: one line each
            raise ConfigError(f"{KEY}: {' '.join(str(e).split())}") from None
    teacher.model.eval().requires_grad_(False)
    _check_fit(teacher, config)
    if d.teacher_sha256 is not None and d.teacher_sha256 != teacher.sha256:
        raise ConfigError(f"{KEY}={d.teacher}: {teacher.file} has sha256 {teacher.sha256} but "
                          f"the run recorded train.distill.teacher_sha256={d.teacher_sha256} "
                          "(the teacher changed); give that teacher back, or start a new run")
    return teacher


def _check_fit(teacher: Teacher, config: Config) -> None:
    """The teacher must classify the student's images: the same classes, image size and
    channels (its own normalization is applied to them)."""
    m = config.model
    for key, theirs, ours, text in (
            ("num_classes", len(teacher.classes), m.num_classes, "has {} classes"),
            ("image_size", teacher.image_size, m.image_size, "takes {0}x{0} images"),
            ("in_channels", teacher.channels, m.in_channels, "takes {}-channel images")):
        if theirs != ours:
            raise ConfigError(
                f"{KEY}={config.train.distill.teacher}: the teacher ({teacher.file}) "
                f"{text.format(theirs)} but the student {text.format(ours)} (model.{key}="
                f"{ours}); a teacher must fit the student's data")


# ---------------------------------------------------------------------------------------------
# The teacher's logits
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherOnBatch:
    """The teacher run on each batch (the images change every epoch under augmentation)."""

    teacher: Teacher

    def __call__(self, batch: Batch) -> torch.Tensor:
        # fp32 whatever the student's precision: the same logits as the cached ones.
        with torch.no_grad(), torch.autocast(batch.images.device.type, enabled=False):
            x = normalize(batch.images, self.teacher.mean, self.teacher.std)
            return self.teacher.model(x).float()


@dataclass
class CachedTeacher:
    """The teacher's logits for the whole training split, looked up by position."""

    table: torch.Tensor  # (training images, classes), on the training device

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.table[batch.index]


def _shard_logits(teacher: Teacher, images: torch.Tensor, batch_size: int,
                  device: torch.device, world: int, rank: int) -> torch.Tensor:
    """The teacher's logits for ``images``: each process computes every world-th image, and
    every process gets the whole table (on ``device``)."""
    n, k = len(images), len(teacher.classes)
    # (0, k) where this process's share is empty (fewer images than processes).
    mine = predict_logits(teacher.model, images[rank::world], teacher.mean, teacher.std,
                          batch_size, device).reshape(-1, k).to(device)
    if world == 1:
        return mine
    rows = -(-n // world)  # all_gather wants equal shapes: every share padded to the longest
    padded = torch.zeros(rows, k, device=device)
    padded[:len(mine)] = mine
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    table = torch.empty(n, k, device=device)
    for r, share in enumerate(shares):
        table[r::world] = share[:len(range(r, n, world))]
    return table


def _test_accuracy(teacher: Teacher, splits: DataSplits, batch_size: int,
                   device: torch.device, world: int, rank: int) -> float:
    """The teacher's accuracy on the student's test split (each process every world-th image)."""
    images, labels = splits.test.images[rank::world], splits.test.labels[rank::world]
    correct = 0  # a test split smaller than the processes: some get no image
    if len(labels):
        logits = predict_logits(teacher.model, images, teacher.mean, teacher.std, batch_size,
                                device)
        correct = (logits.argmax(1) == labels).sum().item()
    counts = torch.tensor([correct, len(labels)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def images_sha256(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, key: dict[str, str], shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached table when ``path`` holds one for this key; None otherwise (a cache that is
    missing, stale or unreadable is computed again and rewritten)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != key or "logits" not in f.keys():  # noqa: SIM118
                return None
            # Shape and type from the header, before the table is read: a cache of another
            # size (or a sparse file claiming any) is never loaded.
            logits = f.get_slice("logits")
            if tuple(logits.get_shape()) != shape or logits.get_dtype() != "F32":
                return None
            return f.get_tensor("logits")
    except (SafetensorError, OSError, ValueError, RuntimeError):  # missing or damaged
        return None


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


@dataclass
class Distillation:
    """A run's teacher, ready: the logits the loss takes, and what the run records."""

    teacher: Teacher
    test_acc: float
    logits: TeacherLogits
    cache: dict[str, Any] | None = None  # a table to write into the run folder, and its key

    def recorded(self, config: Config) -> Config:
        """``config`` with the teacher's sha256 and test accuracy (config.yaml keeps them)."""
        d = replace(config.train.distill, teacher_sha256=self.teacher.sha256,
                    teacher_test_acc=self.test_acc)
        return replace(config, train=replace(config.train, distill=d))

    def record(self, config: Config) -> dict[str, Any]:
        """run.json's ``teacher`` entry."""
        t = self.teacher
        per_batch = isinstance(self.logits, TeacherOnBatch)
        return {"path": config.train.distill.teacher, "file": str(t.file), "sha256": t.sha256,
                "test_acc": self.test_acc, "format": t.format,
                "quantized": t.quantization is not None,
                "quantization": t.quantization or "full precision",
                "logits": ("per batch (augmentation)" if per_batch
                           else f"once for the training split ({rundir.TEACHER_LOGITS})")}

    def save_cache(self, run_dir: Path) -> None:
        """Write the logits table computed at set-up, or read from a folder that no longer
        holds it (a run restarted aside: its file went with the rest)."""
        if self.cache is None:
            return
        if self.cache.get("read") and (run_dir / rundir.TEACHER_LOGITS).is_file():
            self.cache = None
            return
        table, key = self.cache["table"].cpu().contiguous(), self.cache["key"]
        files.atomic_file(run_dir / rundir.TEACHER_LOGITS,
                          lambda tmp: save_file({"logits": table}, str(tmp), metadata=key))
        self.cache = None


def set_up(teacher: Teacher, config: Config, splits: DataSplits, run_dir: Path,
           device: torch.device, world: int = 1, rank: int = 0) -> Distillation:
    """The teacher on the training device (process ``rank`` of ``world``): its test accuracy
    (measured once: a resumed run reads it from its config), and its logits, per batch or,
    without augmentation, once (read from the run folder when it holds them)."""
    d = config.train.distill
    if teacher.classes != list(splits.classes):
        raise ConfigError(f"{KEY}={d.teacher}: the teacher's classes ({', '.join(teacher.classes)}"
                          f") are not the student's data's ({', '.join(splits.classes)})")
    teacher.model.to(device)
    batch_size = config.train.eval_batch_size
    recorded = d.teacher_sha256 is not None and d.teacher_test_acc is not None
    test_acc = (d.teacher_test_acc if recorded
                else _test_accuracy(teacher, splits, batch_size, device, world, rank))
    if augments(config.data):
        return Distillation(teacher, test_acc, TeacherOnBatch(teacher))
    images = splits.train.images
    key = {"teacher_sha256": teacher.sha256, "data_sha256": images_sha256(images)}
    shape = (len(images), len(teacher.classes))
    table = _read_cache(run_dir / rundir.TEACHER_LOGITS, key, shape)
    if table is not None:
        return Distillation(teacher, test_acc, CachedTeacher(table.to(device)),
                            {"table": table, "key": key, "read": True})
    table = _shard_logits(teacher, images, batch_size, device, world, rank)
    return Distillation(teacher, test_acc, CachedTeacher(table), {"table": table, "key": key})
