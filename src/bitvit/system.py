"""Layer 0: what this machine has: the memory available to this process. Imports nothing of
bitvit. Read by training (a model refused before it is built), data (an archive refused
before it fills memory) and the weights readers (a file refused before it is read)."""

from __future__ import annotations

import os
from pathlib import Path


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; far beyond any machine too (the estimate of an absurd config)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    for unit in units[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {units[-1]}"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Per cgroup version: the memory controller's folder under the cgroup mount, its limit and usage
# files, and the key of the reclaimable page cache in memory.stat.
_CGROUP_FILES = {"2": ("", "memory.max", "memory.current", "inactive_file"),
                 "1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                       "total_inactive_file")}


def _own_cgroups(proc_cgroup: Path) -> list[tuple[str, str]]:
    """(version, path) of this process's memory cgroups, as /proc/self/cgroup names them; the
    root when it cannot be read. A job scheduler (Slurm, systemd) limits a sub-folder, which a
    process outside a cgroup namespace sees by its full path."""
    found = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                found.append(("2", path))
            elif "memory" in controllers.split(","):
                found.append(("1", path))
    except (OSError, ValueError):
        pass
    return found or [("2", "/"), ("1", "/")]


def _headroom_in(folder: Path, version: str) -> int | None:
    """What one cgroup folder's memory limit leaves; None without a limit there. The page
    cache's inactive part counts as free, as the kernel reclaims it before failing."""
    _, limit_name, usage_name, inactive_key = _CGROUP_FILES[version]
    try:
        text = (folder / limit_name).read_text().strip()
        if text == "max" or int(text) >= 1 << 60:  # "max" (v2) or v1's "no limit" value
            return None
        limit, usage = int(text), int((folder / usage_name).read_text())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        stat = (folder / "memory.stat").read_text().splitlines()
        inactive = next((int(v) for k, v in (line.split() for line in stat)
                         if k == inactive_key), 0)
    except (OSError, ValueError):
        pass
    return max(limit - usage + inactive, 0)


def _cgroup_headroom(mount: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """What the tightest memory limit over this process's cgroup and its ancestors leaves (v2
    and v1); None without a limit."""
    headrooms = []
    for version, path in _own_cgroups(proc_cgroup):
        base = mount / _CGROUP_FILES[version][0]
        folder = base / path.strip("/")
        while True:
            headroom = _headroom_in(folder, version)
            if headroom is not None:
                headrooms.append(headroom)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(headrooms, default=None)


def host_memory() -> tuple[int, str] | None:
    """(bytes available to this process, where that figure comes from); None when unknown."""
    available, how = _meminfo_available(), "MemAvailable in /proc/meminfo"
    if available is None:
        try:
            import psutil

            available, how = int(psutil.virtual_memory().available), "psutil"
        except ImportError:
            try:
                available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                how = "free pages (sysconf)"
            except (AttributeError, OSError, ValueError):
                available = None
    headroom = _cgroup_headroom()
    if headroom is not None and (available is None or headroom < available):
        available, how = headroom, "this cgroup's memory limit less its usage"
    return None if available is None else (available, how)


def memory_shortfall(size: int, doing: str = "to read") -> str | None:
    """Why ``size`` bytes, read whole into memory, would not fit the memory available to this
    process: a phrase for an error that names the file; None when they fit or it is unknown.
    Weights files are read whole, and a sparse file claims any size for free."""
    memory = host_memory()
    if memory is None or size <= memory[0]:
        return None
    return (f"{human_bytes(size)} {doing}, more than the {human_bytes(memory[0])} of memory "
            f"available ({memory[1]})")
