"""What the benchmarks share: the printed record, the machine (CPU, ISA, integer kernel, commit),
the command line as run, and small helpers. Imported from beside the scripts (``from _common
import ...``), as they run with benchmarks/ on sys.path."""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Environment variables that change which kernels and engines torch, oneDNN and bitvit run:
# part of the command in the record.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "BITVIT_INT_KERNEL",
           "BITVIT_ENGINE")


class Record:
    """Prints lines and keeps them, so that ``--out`` gets exactly what was printed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")


def tune_malloc() -> bool:
    """Keep freed memory in the process (what jemalloc/tcmalloc do), for every model alike.

    glibc returns large blocks (a (16640, 576) activation is 38 MB) to the OS on free and
    page-faults them back in on the next call; at batch 256 that costs more than an int8 matmul.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except OSError:
        return False


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160]


# ---------------------------------------------------------------------------------------------
# The machine: CPU, ISA, kernel choice, commit.
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_info() -> dict[str, object]:
    """ISA summary and the integer kernel `bitvit.nn.kernels` chooses, or a note why not known."""
    try:
        from bitvit.nn.kernels import ISA_ENV as CAPS
        from bitvit.nn.kernels import choose_kernel, cpu_isa, isa_summary

        choice = choose_kernel("cpu")
        isa = cpu_isa()
        # What the CPU offers without the env caps: what ONNX Runtime runs (see main).
        hardware = isa_summary({**isa, **dict.fromkeys(CAPS)})
        return {"isa": isa_summary(isa), "hardware_isa": hardware, "kernel": choice.name,
                "kernel_reason": choice.reason, "cpu_isa": isa}
    except Exception as err:  # noqa: BLE001 - the benchmark runs without it, and says so
        return {"isa": f"torch capability {torch.backends.cpu.get_cpu_capability()}",
                "kernel": None, "kernel_reason": f"bitvit.nn.kernels unavailable ({one_line(err)})"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ISA_ENV if k in os.environ]
    return " ".join([*env, "python", shlex.join(sys.argv)])


def parse_list(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if not items or bad:
        raise ValueError(f"--{what}: {bad[0] if bad else 'empty'!r} is not one of "
                         f"{', '.join(allowed or ())}")
    return items
