"""What run.json says of an invocation of `bitvit train`: the command, the code, the machine,
when it started and how it ended."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bitvit.nn.kernels import cpu_isa, isa_summary
from bitvit.training import rundir

# The folder above the package: src/ in a checkout.
SOURCE = Path(__file__).resolve().parents[2]


def git_commit(source: Path = SOURCE) -> str | None:
    """The commit of the code in ``source``, with ``-dirty`` when that folder has uncommitted
    changes; None outside git."""
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        # The pathspec is relative to -C's folder: "." is the source folder itself.
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cpu_name(device: torch.device) -> str | None:
    """The CPU a CPU run computes on: its model name and the ISA its kernels use. fp32 kernels
    round differently on other CPUs (a bitnet epoch 1 gave train loss 1.82397 on a Xeon Sapphire
    Rapids and 1.82376 on an AMD EPYC Zen 4, same torch and threads), so exactness needs it."""
    if device.type != "cpu":
        return None
    isa = cpu_isa()
    return f"{isa['model_name']} ({isa_summary(isa)})"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(device: torch.device, processes: int,
               command: list[str] | None) -> dict[str, Any]:
    """What run.json says of this invocation when it starts."""
    return {
        "command": command if command is not None else sys.argv,
        "git_commit": git_commit(),
        "device": device_name(device),
        "cpu": cpu_name(device),
        "processes": processes,
        "torch": torch.__version__,
        # With status "running", pid and host tell a live run from a killed one (bitvit sweep).
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": now(),
        "end": None,
        "status": "running",
    }


# What an exact resume needs unchanged (run.json keys): another torch, device or thread count,
# or CPU computes the same epochs with other rounding; another process count also draws other
# augmentation and dropout (each process has its own stream).
EXACT_RESUME_KEYS = ("torch", "device", "cpu", "processes")


def resume_changes(previous: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """``"key OLD -> NEW"`` for each of `EXACT_RESUME_KEYS` that differs between the run's last
    invocation (``previous``, its run.json) and this one (``info``, its `run_record`)."""
    return [f"{k} {previous[k]} -> {info[k]}" for k in EXACT_RESUME_KEYS
            if isinstance(previous.get(k), (str, int)) and previous[k] != info.get(k)]


def resume_notice(run_dir: Path, previous: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The line `bitvit train --resume` prints when `resume_changes` finds any."""
    if changes := resume_changes(previous, info):
        return (f"bitvit train: resuming {run_dir} with {'; '.join(changes)}: the epochs from "
                "here differ from an uninterrupted run's in rounding"
                + (" and in their random draws (augmentation, dropout: one stream per process)"
                   if any(c.startswith("processes ") for c in changes) else ""))
    return None


def failed_start(run_dir: Path, resume: str | Path | None, info: dict[str, Any],
                 error: str) -> None:
    """Write run.json for an invocation that failed while setting up (out of memory): ``info``
    (its `run_record`) with status failed and the error, after the history of a resumed run. A
    new run's folder that already holds a run is left as it is: its run.json is that run's
    record, and the next `bitvit train` there moves it aside."""
    if resume is None and rundir.holds_run(run_dir):
        return
    previous = rundir.read_info(run_dir) if resume is not None else {}
    if previous:
        info["resumed_from"] = rundir.resume_history(previous)
        if previous.get("init_from"):  # which weights the run started from, as a resume keeps
            info["init_from"] = previous["init_from"]
    info.update(status="failed", error=error, end=now())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_info(run_dir, info)
    except OSError:
        pass  # already failing: the out-of-memory error is the one to tell
