"""Memory: a model refused before it is built when its estimate cannot fit, and the allocator's
out-of-memory errors turned into one line.

The estimate is `bitvit.nn.footprint`'s (from the config alone); the memory available is
`bitvit.system.host_memory` (MemAvailable, less what a cgroup limit leaves), or a CUDA device's
free memory. Where none of these can be read, nothing is refused: the allocator's
own error, caught, still ends the command in one line.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from bitvit.nn.footprint import Footprint, estimate
from bitvit.system import host_memory, human_bytes

if TYPE_CHECKING:
    import torch

    from bitvit.training.config import Config

# What the allocators say: torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"),
# CUDA's ("CUDA out of memory"), and others that name it so.
_OOM_TEXT = re.compile(r"can't allocate memory|out of memory|cannot allocate memory",
                       re.IGNORECASE)


class MemoryLimitError(ValueError):
    """A model that cannot fit, refused before it is built, or an allocation that failed; the
    message is one line with the estimate and the memory available."""


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """Free memory of a CUDA device, or the host's for the CPU; None when unknown."""
    if device.type != "cuda":
        return host_memory()
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None
    return int(free), f"free on {device}"


def _describe(config: Config) -> str:
    m = config.model
    return f"model.dim={m.dim}, model.depth={m.depth}, model.patch_size={m.patch_size}"


def _refuse(what: str, need: Footprint, memory: tuple[int, str] | None, detail: str) -> None:
    if memory is None or need.total <= memory[0]:
        return
    raise MemoryLimitError(
        f"{what} needs about {human_bytes(need.total)} of memory but "
        f"{human_bytes(memory[0])} is available ({memory[1]}): {need.parameters:,} parameters "
        f"({human_bytes(need.state_bytes)}) and {human_bytes(need.activation_bytes)} of "
        f"activations {detail}")


def check_training_fits(config: Config, device: torch.device, processes: int = 1) -> None:
    """Refuse (`MemoryLimitError`, one line) a run whose model, optimizer and activations cannot
    fit in ``device``'s memory; the model is built on the host first, so its weights must fit
    there too. Costs nothing: arithmetic on the config."""
    q, batch = config.quant, max(config.train.batch_size // processes, 1)
    need = estimate(config.model, batch, True, q.method, q.where, q.include_patch_embed)
    hint = (f"at train.batch_size={config.train.batch_size}; make model.dim, model.depth or "
            "train.batch_size smaller")
    # The host's memory is shared by the processes torchrun started on it, each with a whole
    # model and optimizer; a GPU is each process's own.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes)) if processes > 1 else 1
    host = _share(host_memory(), local)
    _refuse(f"training this model ({_describe(config)})", need,
            device_memory(device) if device.type == "cuda" else host, hint)
    if device.type == "cuda":
        weights = estimate(config.model, 0, False)
        _refuse(f"building this model ({_describe(config)})", weights, host,
                "before it moves to the GPU")


def _share(memory: tuple[int, str] | None, processes: int) -> tuple[int, str] | None:
    if memory is None or processes <= 1:
        return memory
    return memory[0] // processes, f"{memory[1]}, shared by {processes} processes on this host"


def check_inference_fits(config: Config, source: str, batch_size: int = 1) -> None:
    """Refuse a model (a checkpoint's, a config's) that cannot be built in host memory to run
    a batch of ``batch_size`` images: 1 to load it at all (its training's eval batch size says
    nothing about how it will be run); callers that know their batch pass it."""
    need = estimate(config.model, batch_size, False)
    _refuse(f"{source}: its model ({_describe(config)})", need, host_memory(),
            f"at a batch of {batch_size} image{'s' if batch_size != 1 else ''}")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocator's out-of-memory error (torch's CPU or CUDA allocator, or
    Python's MemoryError)."""
    if isinstance(e, MemoryError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(e, oom_types) or _OOM_TEXT.search(str(e)) is not None


def out_of_memory(e: BaseException, doing: str) -> MemoryLimitError:
    """The one-line error for an allocation that failed while ``doing`` something."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    # A GPU allocator's message says its own capacity; the host's memory is not what ran out.
    memory = None if re.search(r"\b(CUDA|GPU)\b", reason) else host_memory()
    available = f"; {human_bytes(memory[0])} available ({memory[1]})" if memory else ""
    return MemoryLimitError(f"out of memory while {doing} ({reason}){available}")
