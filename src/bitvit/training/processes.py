"""This process among those of a run: one, or several under ``torchrun`` (rank, device, and
the collectives the training loop needs)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bitvit.training.config import Config, ConfigError, resolve_device


@dataclass
class Processes:
    """This process among those of the run (one, or several under ``torchrun``)."""

    world: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0


def processes(config: Config) -> Processes:
    """This process's rank and device; joins the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = Processes(world, int(os.environ.get("RANK", "0")),
                      resolve_device(config.train.device, "train.device"))
    if procs.distributed:
        if procs.device.type == "cuda":
            procs.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(procs.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if procs.device.type == "cuda" else "gloo")
    if config.train.batch_size % world:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by the "
                          f"{world} processes")
    return procs


def all_finite(value: float, distributed: bool, device: torch.device) -> bool:
    """Whether every process's loss is finite, so that all of them stop at the same step
    (a process stopping alone would leave the others waiting in the gradient all-reduce)."""
    finite = math.isfinite(value)
    if not distributed:
        return finite
    flag = torch.tensor([float(finite)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_summed(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (on the CPU) summed over the processes: reduced on ``device``, since NCCL
    reduces only GPU tensors."""
    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()
