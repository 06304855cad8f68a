"""The training loop: a config in; a run folder with curves, checkpoints and provenance out.

One process on CPU or GPU, or several under ``torchrun`` (DistributedDataParallel; only rank 0
writes). A run can be killed at any time and continued with ``resume``: checkpoints are written
to a temporary folder and renamed into place, and every epoch reseeds its randomness from
(seed, epoch, rank), so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bitvit import files
from bitvit.data import DataSplits, ImageSet, augment, balanced_subset, load_data, normalize
from bitvit.nn.methods import FULL_PRECISION
from bitvit.nn.model import VisionTransformer
from bitvit.training import memory, record, rundir
from bitvit.training.checkpoint import (
    CheckpointError,
    build_model,
    load_training_state,
    save_training_checkpoint,
    training_state,
)
from bitvit.training.config import (
    Config,
    ConfigError,
    checked_resume_config,
    load_config,
    save_config,
)
from bitvit.training.distill import Distillation, TeacherLoader, load_teacher
from bitvit.training.distill import set_up as set_up_distillation
from bitvit.training.evaluation import predict_logits
from bitvit.training.losses import Batch, Loss, make_loss
from bitvit.training.pretrained import Source, init_model, read_source, source_config
from bitvit.training.processes import Processes, all_finite, all_summed, processes
from bitvit.training.rundir import (
    TRAIN_EVAL_COLUMNS,
    read_metrics,
    swap_folder,
    write_metrics,
)

# The eval-mode train columns (rundir.TRAIN_EVAL_COLUMNS) measure this many training images.
TRAIN_EVAL_SIZE = 10_000


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message is one line."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | failed | interrupted
    metrics: list[dict[str, float]]  # one row per epoch, as in metrics.csv

    @property
    def final(self) -> dict[str, float]:
        return self.metrics[-1] if self.metrics else {}


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def make_optimizer(model: VisionTransformer, cfg: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier of the base lr at a step: linear warmup, then constant or cosine to ``floor``."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Reseed dropout (global RNG) and return the generator for augmentation, per epoch."""
    # Folded below 2**63, which torch takes: a seed near the top of train.seed's range would
    # overflow it; the seeds of every run so far are far below and unchanged.
    torch.manual_seed((seed * 1_000_003 + epoch * 1_009 + rank) % 2**63)
    return torch.Generator().manual_seed((seed * 7_919 + epoch * 104_729 + rank) % 2**63)


def _epoch_order(n: int, seed: int, epoch: int, world: int, rank: int) -> torch.Tensor:
    """This rank's sample order for an epoch; concatenated over ranks it is one global order."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _default_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}_{config.quant.method}_s{config.train.seed}"


def train(config: Config, out: str | Path | None = None, resume: str | Path | None = None,
          quiet: bool = False, command: list[str] | None = None,
          teacher_loader: TeacherLoader | None = None, announce: str | None = None) -> RunResult:
    """Train a model as ``config`` says into the run folder ``out`` (or continue ``resume``).

    ``teacher_loader`` reads ``train.distill.teacher`` (`bitvit.training.distill`); the default
    reads run folders and checkpoints, `bitvit.load_teacher` also exported models.
    ``announce`` is a line printed to stderr once the run is set up, before it trains (an
    error before then prints only the error).

    Returns the run's metrics. Raises `TrainingError` on a non-finite loss or parameters
    (``last/`` keeps the last good epoch), OSError naming the file when the disk is full or
    read-only (the run marked failed, ``last/`` intact), `RunBusyError` when another process
    holds the folder's lock, and lets KeyboardInterrupt through after marking the run
    interrupted. A folder that holds a run without a checkpoint (killed in its first epoch) is
    moved aside to ``OUT.restart-TIME/`` and the run starts again. Subnormal floats are
    flushed to zero while it runs (`flush_subnormals`).
    """
    run_dir = Path(resume) if resume is not None else Path(out or _default_run_dir(config))
    if resume is not None and rundir.holds_run(run_dir) and not rundir.has_checkpoint(run_dir):
        # Killed in its first epoch, before last/ was written: nothing to continue, so it
        # starts again (the folder moved aside), as the command that began it would.
        resume = None

    if resume is None and (entry := rundir.foreign_entry(run_dir)) is not None:
        # Before the lock file: nothing is written among the user's own files.
        raise ConfigError(f"{run_dir}: holds files that are not a bitvit run ({entry}...); "
                          "choose a new or empty --out")

    def run() -> RunResult:
        with flush_subnormals():
            return _train(config, run_dir, resume, quiet, command, teacher_loader, announce)

    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes, so only it owns the folder
        return run()
    if resume is not None and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder; cannot resume")
    created = not run_dir.exists()
    # Held for the whole run, so a second `bitvit train` into the folder is refused at once.
    with rundir.locked(run_dir):
        try:
            return run()
        except BaseException:
            if created and rundir.is_empty(run_dir):  # a bad config leaves nothing behind
                (run_dir / rundir.LOCK).unlink(missing_ok=True)
                run_dir.rmdir()
            raise


@contextmanager
def flush_subnormals() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread (and threads it starts) on x86 CPUs.

    Late in training, full precision's gradients underflow to subnormals, which the CPU handles
    in microcode: a 100-epoch fp model's step took 1.72x (1 thread) and 1.82x (2 threads) its
    time with flushing (benchmarks/subnormals.py). Flushing them changed no number of an epoch
    trained both ways (the values are below 1.2e-38, lost in every sum with a normal number).
    The previous mode is restored.
    """
    was_on = (torch.tensor([1e-39]) * 1.0).item() == 0.0  # subnormal in, zero out: flushing
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


@dataclass
class Session:
    """Everything an epoch needs, built once by `_set_up`."""

    config: Config
    run_dir: Path
    procs: Processes
    splits: DataSplits
    train: ImageSet  # the training split, on the device
    train_eval: ImageSet  # a fixed class-balanced subset of the training split
    model: VisionTransformer
    net: nn.Module  # the model as trained: wrapped by DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    loss: Loss
    columns: list[str]
    rows: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 1
    best_acc: float = -1.0
    distillation: Distillation | None = None  # the teacher, when train.distill names one
    source: Source | None = None  # the pretrained model the weights start from (init_from)


def _train(config: Config, run_dir: Path, resume: str | Path | None, quiet: bool,
           command: list[str] | None, teacher_loader: TeacherLoader | None,
           announce: str | None) -> RunResult:
    procs = processes(config)
    try:
        s = _set_up(config, run_dir, resume, procs, teacher_loader)
    except (RuntimeError, MemoryError) as e:
        if not memory.is_out_of_memory(e):
            raise
        error = memory.out_of_memory(e, "setting up the run (data, model, optimizer)")
        if procs.writer:
            record.failed_start(run_dir, resume, record.run_record(procs.device, procs.world,
                                                                   command), str(error))
        raise error from None
    if s.start_epoch > s.config.train.epochs:  # a finished run: nothing to train or record
        if procs.writer:
            n = s.config.train.epochs
            print(f"bitvit train: {run_dir} has trained its {n} epoch{'s' * (n != 1)} already; "
                  "nothing to do (--epochs N extends it)", file=sys.stderr)
        return RunResult(run_dir, "finished", s.rows)
    info = _open_run_folder(s, resume, command)
    if announce and procs.writer:
        print(announce, file=sys.stderr)
    wall_start, status, epoch = time.perf_counter(), "failed", s.start_epoch
    try:
        for epoch in range(s.start_epoch, s.config.train.epochs + 1):
            t0 = time.perf_counter()
            row = _train_epoch(s, epoch, quiet)
            row.update(_evaluate_epoch(s))
            _check_finite(s, row, epoch)
            row["seconds"] = time.perf_counter() - t0
            s.rows.append(row)
            _record_epoch(s, row, epoch, quiet)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except TrainingError as e:
        info["error"] = str(e)
        raise
    except OSError as e:  # disk full, read-only: the write that failed left last/ as it was
        info["error"] = files.describe(e)
        raise
    except (RuntimeError, MemoryError) as e:
        if not memory.is_out_of_memory(e):
            raise
        error = memory.out_of_memory(e, f"training epoch {epoch} (last/ keeps the epoch before)")
        info["error"] = str(error)
        raise error from None
    finally:
        _close_run_folder(s, info, status, time.perf_counter() - wall_start)
    return RunResult(run_dir, status, s.rows)


# ---------------------------------------------------------------------------------------------
# Setting up
# ---------------------------------------------------------------------------------------------


def _set_up(config: Config, run_dir: Path, resume: str | Path | None, procs: Processes,
            teacher_loader: TeacherLoader | None) -> Session:
    """Data, model, optimizer and schedule, the teacher, and the resumed state. Writes nothing,
    so that a bad config, data path or teacher leaves no run folder behind."""
    tc = config.train
    saved = None
    if resume is not None:  # the Python API takes any config: it must be the run's own
        saved = load_config(run_dir / rundir.CONFIG)
        config = checked_resume_config(saved, config, run_dir)
    if resume is None and rundir.has_checkpoint(run_dir):  # every rank: none may go on alone
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume {run_dir} to continue it "
                          f"or choose another --out")
    source = None
    if tc.init_from and resume is None:
        # The model is the source's (its architecture, its normalization where data says auto).
        source = read_source(tc.init_from)
        config = source_config(config, source)
    # Before reading data or building anything: a model that cannot fit is refused at once.
    memory.check_training_fits(config, procs.device, procs.world)
    teacher = load_teacher(config, teacher_loader)  # before the data: a misfit fails at once
    splits = load_data(config.data, config.model.image_size, config.model.in_channels)
    if len(splits.classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes} but the data has "
                          f"{len(splits.classes)} classes ({', '.join(splits.classes[:5])}...)")
    # The run uses and records (config.yaml, checkpoints, exports) the numbers auto resolved to.
    config = replace(config, data=replace(config.data, mean=splits.mean, std=splits.std))

    torch.manual_seed(tc.seed)
    model = build_model(config)
    if source is not None:  # e.g. quantization-aware training from a full-precision model
        for note in init_model(model, source, config, splits.classes):
            if procs.writer:
                print(f"bitvit train: {note}", file=sys.stderr)
    model.to(procs.device)
    optimizer = make_optimizer(model, tc)
    steps_per_epoch = len(splits.train.labels) // tc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the training set "
                          f"({len(splits.train.labels)} images)")
    scheduler = _scheduler(optimizer, tc, steps_per_epoch)
    if 0 < tc.epochs <= tc.warmup_epochs and procs.writer:  # e.g. strong.yaml cut to 2 epochs
        print(f"bitvit train: train.warmup_epochs={tc.warmup_epochs:g} >= train.epochs="
              f"{tc.epochs}: the lr rises all run, never reaching lr={tc.lr:g}", file=sys.stderr)
    distillation = None if teacher is None else set_up_distillation(
        teacher, config, splits, run_dir, procs.device, procs.world, procs.rank)
    if distillation is not None:  # config.yaml and the checkpoints record the teacher
        config = distillation.recorded(config)
    train = ImageSet(splits.train.images.to(procs.device), splits.train.labels.to(procs.device),
                     splits.classes)
    s = Session(config, run_dir, procs, splits, train,
                # Seeded by the data seed: the same images every epoch, on every rank, on resume.
                balanced_subset(splits.train, TRAIN_EVAL_SIZE, config.data.seed),
                model, _wrap(model, tc, procs), optimizer, scheduler, steps_per_epoch,
                make_loss(config, None if distillation is None else distillation.logits), [],
                distillation=distillation, source=source)
    if resume is not None:
        s.start_epoch, s.best_acc = load_training_state(run_dir / rundir.LAST, model, optimizer,
                                                        scheduler, config, splits.classes)
        if tc.epochs < s.start_epoch - 1:  # would rewrite config.yaml to fewer than it holds
            raise ConfigError(f"{run_dir}: holds {s.start_epoch - 1} epochs; train.epochs="
                              f"{tc.epochs} (--epochs) cannot shorten a run, only extend it")
        if procs.writer:
            _say_schedule_change(run_dir, saved.train, tc)
        s.rows = [r for r in read_metrics(run_dir / rundir.METRICS)
                  if r["epoch"] < s.start_epoch]
    s.columns = rundir.metric_columns(splits.val is not None, s.rows)
    return s


def _say_schedule_change(run_dir: Path, saved: Any, asked: Any) -> None:
    """A cosine is spread over the run's length: the epochs trained so far followed the old."""
    if asked.epochs != saved.epochs and saved.schedule != "constant":
        verb = "extending" if asked.epochs > saved.epochs else "shortening"
        print(f"bitvit train: {verb} {run_dir} from {saved.epochs} to {asked.epochs} epochs "
              f"under train.schedule={saved.schedule}: its lr now decays over {asked.epochs} "
              f"epochs, so the run is not what {asked.epochs} epochs from the start give",
              file=sys.stderr)


def _scheduler(optimizer: torch.optim.Optimizer, tc: Any,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total_steps = steps_per_epoch * tc.epochs
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    floor = tc.min_lr / tc.lr if tc.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.schedule, floor))


def _wrap(model: nn.Module, tc: Any, procs: Processes) -> nn.Module:
    """The model as the training step calls it: under DDP with several processes, compiled when
    ``train.compile`` asks."""
    net = model
    if procs.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    return torch.compile(net) if tc.compile else net


def _open_run_folder(s: Session, resume: str | Path | None,
                     command: list[str] | None) -> dict[str, Any]:
    """run.json's record, written with config.yaml when this process writes."""
    info = {**record.run_record(s.procs.device, s.procs.world, command),
            "data": str(s.splits.source), "data_sha256": s.splits.sha256()}
    if s.distillation is not None:
        info["teacher"] = s.distillation.record(s.config)
    if resume is not None:  # every rank: none may go on alone
        recorded = rundir.read_info(s.run_dir).get("data_sha256")
        if recorded not in (None, info["data_sha256"]):  # older runs did not record it
            raise ConfigError(f"{s.run_dir}: the data at {s.splits.source} are not the images "
                              f"the run trained on (sha256 {info['data_sha256'][:12]}... of its "
                              f"splits, recorded {str(recorded)[:12]}...); resume on its own data")
    if not s.procs.writer:
        return info
    if resume is None and rundir.holds_run(s.run_dir):
        # Killed before its first checkpoint: nothing to resume, nothing to delete either.
        aside = rundir.move_aside(s.run_dir)
        print(f"bitvit train: {s.run_dir} held a run without a checkpoint; moved it to "
              f"{aside} and starting again", file=sys.stderr)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    previous = rundir.read_info(s.run_dir) if resume is not None else {}
    if previous:
        info["resumed_from"] = rundir.resume_history(previous)
        if notice := record.resume_notice(s.run_dir, previous, info):
            print(notice, file=sys.stderr)
    # Which weights the run started from: the file and its SHA-256 (kept when resumed).
    init_from = s.source.record() if s.source is not None else previous.get("init_from")
    if init_from:
        info["init_from"] = init_from
    rundir.write_info(s.run_dir, info)  # first: what marks the folder as a run's
    save_config(s.config, s.run_dir / rundir.CONFIG)
    if s.distillation is not None:
        s.distillation.save_cache(s.run_dir)
    return info


# ---------------------------------------------------------------------------------------------
# An epoch: train, evaluate, check, record
# ---------------------------------------------------------------------------------------------


def _train_epoch(s: Session, epoch: int, quiet: bool) -> dict[str, float]:
    """One pass over the training split; the running train-mode loss and accuracy."""
    tc, procs, data = s.config.train, s.procs, s.config.data
    t0 = time.perf_counter()
    generator = _seed_epoch(tc.seed, epoch, procs.rank)
    images, labels = s.train.images, s.train.labels
    order = _epoch_order(len(labels), tc.seed, epoch, procs.world, procs.rank)
    per_rank = tc.batch_size // procs.world
    autocast = (torch.autocast(procs.device.type, dtype=torch.bfloat16)
                if tc.precision == "bf16" else nullcontext())
    s.net.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    bar = _progress(s.steps_per_epoch, epoch, tc.epochs, quiet or not procs.writer)
    lr = s.optimizer.param_groups[0]["lr"]
    for step in range(s.steps_per_epoch):
        idx = order[step * per_rank:(step + 1) * per_rank].to(procs.device)
        batch = Batch(augment(images[idx], data, generator), labels[idx], idx)
        with autocast:
            logits = s.net(normalize(batch.images, data.mean, data.std))
            loss = s.loss(logits, batch)
        loss_value = loss.item()
        if not all_finite(loss_value, procs.distributed, procs.device):
            what = (f"loss is {loss_value}" if not math.isfinite(loss_value)
                    else "another process's loss is not finite")
            raise _non_finite(f"{what} at epoch {epoch}, step {step + 1}", epoch, s.run_dir)
        lr = s.optimizer.param_groups[0]["lr"]  # the rate this step uses (the schedule moves on)
        _step(s, loss)
        n = len(batch.labels)
        correct = (logits.argmax(1) == batch.labels).sum().item()
        sums += torch.tensor([loss_value * n, correct, n], dtype=torch.float64)
        if bar is not None:
            seen = (step + 1) * tc.batch_size
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    if procs.distributed:
        sums = all_summed(sums, procs.device)
    return {"epoch": epoch, "train_loss": (sums[0] / sums[2]).item(),
            "train_acc": (sums[1] / sums[2]).item(), "lr": lr}


def _step(s: Session, loss: torch.Tensor) -> None:
    """Backward, clip, update, advance the schedule."""
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.config.train.grad_clip:
        nn.utils.clip_grad_norm_(s.model.parameters(), s.config.train.grad_clip)
    s.optimizer.step()
    s.scheduler.step()


def _evaluate_epoch(s: Session) -> dict[str, float]:
    """Test (and validation, and eval-mode train) loss and accuracy."""
    sets = {"test": s.splits.test, "val": s.splits.val,
            "train_eval": s.train_eval if TRAIN_EVAL_COLUMNS[0] in s.columns else None}
    row = {}
    for split, data in sets.items():
        if data is not None:
            row[f"{split}_loss"], row[f"{split}_acc"] = _evaluate_sharded(s, data)
    return row


def _check_finite(s: Session, row: dict[str, float], epoch: int) -> None:
    """Every process sees the same parameters and the same all-reduced losses, so all of them
    stop here together; nothing of this epoch is saved."""
    if not all(torch.isfinite(p).all() for p in s.model.parameters()):
        raise _non_finite(f"parameters are not finite after epoch {epoch}", epoch, s.run_dir)
    for split in ("test", "val", "train_eval"):
        if not math.isfinite(row.get(f"{split}_loss", 0.0)):
            raise _non_finite(f"{split} loss is {row[f'{split}_loss']} after epoch {epoch}",
                              epoch, s.run_dir)


def _record_epoch(s: Session, row: dict[str, float], epoch: int, quiet: bool) -> None:
    """The metrics row, the curves and the checkpoints (rank 0 writes; all wait for it)."""
    if s.procs.writer:
        is_best = s.splits.val is not None and row["val_acc"] > s.best_acc
        s.best_acc = max(s.best_acc, row.get("val_acc", -1.0))
        state = training_state(s.optimizer, s.scheduler, epoch, s.best_acc)
        # Order for a kill at any point: the metrics row and best/ first, last/ last. Until
        # last/ moves on, resume redoes this epoch: it drops the row and rewrites best/
        # identically; the other way round a kill would lose the row for good.
        write_metrics(s.run_dir / rundir.METRICS, s.rows, s.columns)
        rundir.plot_curves(s.rows, s.run_dir / rundir.CURVES, _title(s.config))
        write = partial(save_training_checkpoint, model=s.model, config=s.config,
                        classes=s.splits.classes, state=state)
        if is_best:
            swap_folder(s.run_dir / rundir.BEST, write)
        swap_folder(s.run_dir / rundir.LAST, write)
        if quiet:
            print(_summary_line(row, s.config.train.epochs), flush=True)
    if s.procs.distributed:
        dist.barrier()


def _close_run_folder(s: Session, info: dict[str, Any], status: str, wall: float) -> None:
    """run.json's final status, end time and wall time."""
    if not s.procs.writer:
        return
    info.update(status=status, end=record.now(), wall_seconds=round(wall, 1))
    try:
        rundir.write_info(s.run_dir, info)
    except OSError:
        if status == "finished":
            raise
        # Already failing (the disk is full, say): the first error is the one to tell.


def _non_finite(what: str, epoch: int, run_dir: Path) -> TrainingError:
    """The error that stops a run on a non-finite value, saying what the run folder keeps."""
    kept = (f"{run_dir / 'last'} keeps epoch {epoch - 1}" if epoch > 1
            else "no checkpoint was saved (it happened in the first epoch)")
    return TrainingError(f"{what}: stopping; {kept}")


def _evaluate_sharded(s: Session, data: ImageSet) -> tuple[float, float]:
    """(loss, accuracy) over the whole set; each process takes every world-th image."""
    world, rank = s.procs.world, s.procs.rank
    shard = ImageSet(data.images[rank::world], data.labels[rank::world], data.classes)
    sums = torch.zeros(3, dtype=torch.float64)  # a set smaller than the processes: some get none
    if len(shard.labels):
        logits = predict_logits(s.model, shard.images, s.config.data.mean, s.config.data.std,
                                s.config.train.eval_batch_size, s.procs.device)
        sums[:] = torch.tensor([F.cross_entropy(logits, shard.labels, reduction="sum").item(),
                                (logits.argmax(1) == shard.labels).sum().item(),
                                len(shard.labels)])
    if world > 1:
        sums = all_summed(sums, s.procs.device)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def _title(config: Config) -> str:
    q = config.quant
    quant = (
        "fp32" if q.method == FULL_PRECISION else f"{q.method} ({q.where}, act {q.act_bits})")
    m = config.model
    return f"ViT p{m.patch_size} d{m.dim} L{m.depth}, {quant}, seed {config.train.seed}"


def _summary_line(row: dict[str, float], epochs: int) -> str:
    text = (f"epoch {int(row['epoch'])}/{epochs}  train {row['train_loss']:.4f} "
            f"{row['train_acc']:.4f}  test {row['test_loss']:.4f} {row['test_acc']:.4f}")
    if "val_acc" in row:
        text += f"  val {row['val_loss']:.4f} {row['val_acc']:.4f}"
    if "train_eval_acc" in row:
        text += f"  train(eval) {row['train_eval_loss']:.4f} {row['train_eval_acc']:.4f}"
    return text + f"  {row['seconds']:.1f}s"


def _progress(total: int, epoch: int, epochs: int, disable: bool) -> Any:
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=True)


def config_for_resume(run_dir: str | Path, epochs: int | None = None) -> Config:
    """The saved config of a run, optionally with more epochs (to extend a finished run)."""
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: missing; --resume needs a run folder written by bitvit train")
    config = load_config(path)
    if epochs is not None:
        config.train = replace(config.train, epochs=epochs)
    return config
