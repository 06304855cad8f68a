"""The training loop: a config in; a run folder with curves, checkpoints and provenance out.

One process on CPU or GPU, or several under ``torchrun`` (DistributedDataParallel; only rank 0
writes). A run can be killed at any time and continued with ``resume``: checkpoints are written
to a temporary folder and renamed into place, and every epoch reseeds its randomness from
(seed, epoch, rank), so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bitvit import files
from bitvit.data import ImageSet, augment, balanced_subset, load_data, normalize
from bitvit.nn.methods import FULL_PRECISION
from bitvit.nn.model import VisionTransformer
from bitvit.training import rundir
from bitvit.training.checkpoint import (  # noqa: F401 - STATE_KEYS: importable from here, as it was
    STATE_KEYS,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_state,
    load_training_state,
    save_training_checkpoint,
    training_state,
)
from bitvit.training.config import Config, ConfigError, load_config, resolve_device, save_config
from bitvit.training.evaluation import predict_logits
from bitvit.training.rundir import (  # noqa: F401 - read_metrics: importable from here, as it was
    read_metrics,
    swap_folder,
    write_metrics,
)

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"]
VAL_COLUMNS = ["val_loss", "val_acc"]
# The model in eval mode (no dropout, no augmentation) on a fixed class-balanced subset of the
# training split: unlike train_loss/train_acc, a running average in train mode, it compares
# with test_loss/test_acc. Last in the row, so folders written before these columns still read.
TRAIN_EVAL_COLUMNS = ["train_eval_loss", "train_eval_acc"]
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
    torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    return torch.Generator().manual_seed(seed * 7_919 + epoch * 104_729 + rank)


def _epoch_order(n: int, seed: int, epoch: int, world: int, rank: int) -> torch.Tensor:
    """This rank's sample order for an epoch; concatenated over ranks it is one global order."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def plot_curves(rows: list[dict[str, float]], path: Path, title: str) -> None:
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
        files.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _default_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}_{config.quant.method}_s{config.train.seed}"


def train(config: Config, out: str | Path | None = None, resume: str | Path | None = None,
          quiet: bool = False, command: list[str] | None = None) -> RunResult:
    """Train a model as ``config`` says into the run folder ``out`` (or continue ``resume``).

    Returns the run's metrics. Raises `TrainingError` on a non-finite loss or parameters
    (``last/`` keeps the last good epoch), OSError naming the file when the disk is full or
    read-only (the run marked failed, ``last/`` intact), `RunBusyError` when another process
    holds the folder's lock, and lets KeyboardInterrupt through after marking the run
    interrupted. A folder that holds a run without a checkpoint (killed in its first epoch) is
    moved aside to ``OUT.restart-TIME/`` and the run starts again.
    """
    run_dir = Path(resume) if resume is not None else Path(out or _default_run_dir(config))
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes, so only it owns the folder
        return _train(config, run_dir, resume, quiet, command)
    if resume is not None and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder; cannot resume")
    created = not run_dir.exists()
    # Held for the whole run, so a second `bitvit train` into the folder is refused at once.
    with rundir.locked(run_dir):
        try:
            return _train(config, run_dir, resume, quiet, command)
        except BaseException:
            if created and rundir.is_empty(run_dir):  # a bad config leaves nothing behind
                (run_dir / rundir.LOCK).unlink(missing_ok=True)
                run_dir.rmdir()
            raise


def _train(config: Config, run_dir: Path, resume: str | Path | None, quiet: bool,
           command: list[str] | None) -> RunResult:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    device = resolve_device(config.train.device, "train.device")
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tc = config.train
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the "
                          f"{world} processes")

    metrics_path = run_dir / rundir.METRICS
    writer = rank == 0
    if resume is None and writer and rundir.has_checkpoint(run_dir):
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume {run_dir} to continue it "
                          f"or choose another --out")
    # The run folder is created only once data, model and checkpoints have loaded, so that a
    # bad config or data path leaves nothing behind.
    splits = load_data(config.data, config.model.image_size, config.model.in_channels)
    classes = splits.classes
    if len(classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes} but the data has "
                          f"{len(classes)} classes ({', '.join(classes[:5])}...)")
    # The run uses and records (config.yaml, checkpoints, exports) the numbers auto resolved to.
    config = replace(config, data=replace(config.data, mean=splits.mean, std=splits.std))
    mean, std = config.data.mean, config.data.std

    torch.manual_seed(tc.seed)
    model = build_model(config)
    if tc.init_from and resume is None:
        # Quantization-aware training from a full-precision model: same keys, same shapes.
        source = load_checkpoint(tc.init_from)
        load_state(model, source.model.state_dict(), source.path)
    model.to(device)
    optimizer = make_optimizer(model, tc)
    steps_per_epoch = len(splits.train.labels) // tc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the training set "
                          f"({len(splits.train.labels)} images)")
    total_steps = steps_per_epoch * tc.epochs
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    floor = tc.min_lr / tc.lr if tc.lr else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.schedule, floor))

    start_epoch, best_acc = 1, -1.0
    rows = read_metrics(metrics_path) if resume is not None else []
    if resume is not None:
        start_epoch, best_acc = load_training_state(run_dir / "last", model, optimizer, scheduler)
        rows = [r for r in rows if r["epoch"] < start_epoch]
    columns = METRIC_COLUMNS + (VAL_COLUMNS if splits.val is not None else [])
    # A run resumed from a folder written before the train-eval columns keeps its columns.
    if not rows or TRAIN_EVAL_COLUMNS[0] in rows[0]:
        columns += TRAIN_EVAL_COLUMNS
    # Seeded by the data seed: the same images every epoch, on every rank and after a resume.
    train_eval = balanced_subset(splits.train, TRAIN_EVAL_SIZE, config.data.seed)

    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                else nullcontext())

    run_info = {
        "command": command if command is not None else sys.argv,
        "git_commit": _git_commit(),
        "device": _device_name(device),
        "processes": world,
        "torch": torch.__version__,
        "data": str(splits.source),
        # With status "running", pid and host tell a live run from a killed one (bitvit sweep).
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "end": None,
        "status": "running",
    }
    if writer:
        if resume is None and rundir.holds_run(run_dir):
            # Killed before its first checkpoint: nothing to resume, nothing to delete either.
            aside = rundir.move_aside(run_dir)
            print(f"bitvit train: {run_dir} held a run without a checkpoint; moved it to "
                  f"{aside} and starting again", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        previous = rundir.read_info(run_dir) if resume is not None else {}
        if previous:
            run_info["resumed_from"] = rundir.resume_history(previous)
        save_config(config, run_dir / rundir.CONFIG)
        rundir.write_info(run_dir, run_info)

    wall_start = time.perf_counter()
    train_images = splits.train.images.to(device)
    train_labels = splits.train.labels.to(device)
    status = "failed"
    try:
        for epoch in range(start_epoch, tc.epochs + 1):
            t0 = time.perf_counter()
            generator = _seed_epoch(tc.seed, epoch, rank)
            order = _epoch_order(len(train_labels), tc.seed, epoch, world, rank)
            per_rank = tc.batch_size // world
            net.train()
            sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
            bar = _progress(steps_per_epoch, epoch, tc.epochs, quiet or not writer)
            for step in range(steps_per_epoch):
                idx = order[step * per_rank:(step + 1) * per_rank].to(device)
                x = augment(train_images[idx], config.data, generator)
                x, y = normalize(x, mean, std), train_labels[idx]
                with autocast:
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
                loss_value = loss.item()
                if not _all_finite(loss_value, distributed, device):
                    what = (f"loss is {loss_value}" if not math.isfinite(loss_value)
                            else "another process's loss is not finite")
                    raise _non_finite(f"{what} at epoch {epoch}, step {step + 1}", epoch, run_dir)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                n = len(y)
                correct = (logits.argmax(1) == y).sum().item()
                sums += torch.tensor([loss_value * n, correct, n], dtype=torch.float64)
                if bar is not None:
                    seen = (step + 1) * tc.batch_size
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                    bar.update()
            if bar is not None:
                bar.close()
            if distributed:
                dist.all_reduce(sums)
            row = {"epoch": epoch, "train_loss": (sums[0] / sums[2]).item(),
                   "train_acc": (sums[1] / sums[2]).item()}
            test = _evaluate_sharded(model, splits.test, mean, std, tc.eval_batch_size, device,
                                     world, rank)
            row.update(test_loss=test[0], test_acc=test[1], lr=scheduler.get_last_lr()[0])
            if splits.val is not None:
                val = _evaluate_sharded(model, splits.val, mean, std, tc.eval_batch_size, device,
                                        world, rank)
                row.update(val_loss=val[0], val_acc=val[1])
            if TRAIN_EVAL_COLUMNS[0] in columns:
                fit = _evaluate_sharded(model, train_eval, mean, std, tc.eval_batch_size,
                                        device, world, rank)
                row.update(train_eval_loss=fit[0], train_eval_acc=fit[1])
            # Every process sees the same parameters and the same all-reduced losses, so all
            # of them stop here together; nothing of this epoch is saved.
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise _non_finite(f"parameters are not finite after epoch {epoch}", epoch,
                                  run_dir)
            for split in ("test", "val", "train_eval"):
                if not math.isfinite(row.get(f"{split}_loss", 0.0)):
                    raise _non_finite(f"{split} loss is {row[f'{split}_loss']} after epoch "
                                      f"{epoch}", epoch, run_dir)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if writer:
                is_best = splits.val is not None and row["val_acc"] > best_acc
                best_acc = max(best_acc, row.get("val_acc", -1.0))
                state = training_state(optimizer, scheduler, epoch, best_acc)
                # Order for a kill at any point: the metrics row and best/ first, last/ last.
                # Until last/ moves on, resume redoes this epoch: it drops the row and rewrites
                # best/ identically; the other way round a kill would lose the row for good.
                write_metrics(metrics_path, rows, columns)
                plot_curves(rows, run_dir / rundir.CURVES, _title(config))
                write = partial(save_training_checkpoint, model=model, config=config,
                                classes=classes, state=state)
                if is_best:
                    swap_folder(run_dir / rundir.BEST, write)
                swap_folder(run_dir / rundir.LAST, write)
                if quiet:
                    print(_summary_line(row, tc.epochs), flush=True)
            if distributed:
                dist.barrier()
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except TrainingError as e:
        run_info["error"] = str(e)
        raise
    except OSError as e:  # disk full, read-only: the write that failed left last/ as it was
        run_info["error"] = files.describe(e)
        raise
    finally:
        if writer:
            run_info.update(status=status,
                            end=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            wall_seconds=round(time.perf_counter() - wall_start, 1))
            try:
                rundir.write_info(run_dir, run_info)
            except OSError:
                if status == "finished":
                    raise
                # Already failing (the disk is full, say): the first error is the one to tell.
    return RunResult(run_dir, status, rows)


def _non_finite(what: str, epoch: int, run_dir: Path) -> TrainingError:
    """The error that stops a run on a non-finite value, saying what the run folder keeps."""
    kept = (f"{run_dir / 'last'} keeps epoch {epoch - 1}" if epoch > 1
            else "no checkpoint was saved (it happened in the first epoch)")
    return TrainingError(f"{what}: stopping; {kept}")


def _all_finite(value: float, distributed: bool, device: torch.device) -> bool:
    """Whether every process's loss is finite, so that all of them stop at the same step
    (a process stopping alone would leave the others waiting in the gradient all-reduce)."""
    finite = math.isfinite(value)
    if not distributed:
        return finite
    flag = torch.tensor([float(finite)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _evaluate_sharded(model: nn.Module, data: ImageSet, mean: tuple[float, ...],
                      std: tuple[float, ...], batch_size: int, device: torch.device,
                      world: int, rank: int) -> tuple[float, float]:
    """(loss, accuracy) over the whole set; each process takes every world-th image."""
    shard = ImageSet(data.images[rank::world], data.labels[rank::world], data.classes)
    logits = predict_logits(model, shard.images, mean, std, batch_size, device)
    sums = torch.tensor([F.cross_entropy(logits, shard.labels, reduction="sum").item(),
                         (logits.argmax(1) == shard.labels).sum().item(), len(shard.labels)],
                        dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
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
