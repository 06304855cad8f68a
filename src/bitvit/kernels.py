"""Choosing and running the integer product of a quantized layer: int8 activation codes (M, K)
times ternary/binary weight codes (K, N).

Two kernels compute the same, exact, integers:

- ``"int8"``: `torch._int_mm`, int8 x int8 -> int32. Fast where the CPU has VNNI or AMX (and on
  CUDA); on a CPU with AVX2 only (e.g. AMD Zen 3) it can be many times slower than fp32.
- ``"fp32"``: the codes as floats through the fp32 matmul (BLAS). Exact too: an activation code
  has ``|q| <= 127`` (`bitvit.quant.absmax_int8`; 1 for sign activations), a weight code
  ``|w| <= 1``, so every product and every partial sum, in any order, is an integer of magnitude
  at most ``K * 127 < 2**24`` for ``K <= MAX_EXACT_K`` (132,104), and fp32 holds those exactly.
  Even a reduced-precision fp32 matmul (TF32, or bf16 on AMX) holds |q| <= 127 exactly.

`choose_kernel` decides once per process: CUDA takes ``int8``; on a CPU, ``$BITVIT_INT_KERNEL``
(``int8`` or ``fp32``) decides, else a micro-benchmark of the two (well under a second), whose
verdict is cached per machine in ``kernels.json`` in the bitvit cache folder (``$BITVIT_CACHE``,
else ``~/.cache/bitvit``), keyed by CPU model, ISA (`isa_summary`), torch version and thread
count. `int_matmul` runs a kernel; both results are accepted by `bitvit.quant.rescale` and give
identical values there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("bitvit.kernels")

KERNELS = ("int8", "fp32")
KERNEL_ENV = "BITVIT_INT_KERNEL"
CACHE_FILE = "kernels.json"
CACHE_VERSION = 1
# The largest K for which the fp32 product of codes |q| <= 127, |w| <= 1 is exact.
MAX_EXACT_K = 2**24 // 127
# Paper-like (M, K, N): qkv, fc1 and fc2 of the dim-256 ViT on a 512-token slab, and a
# batch-1 inference (65 tokens). The verdict is the geometric mean of the per-shape ratios.
BENCH_SHAPES = ((512, 256, 768), (512, 256, 1024), (512, 1024, 256), (65, 256, 1024))
BENCH_BUDGET_S = 0.3  # timed rounds stop once this much has been spent...
MAX_ROUNDS = 20  # ...or after this many (the best of many resists a shared core's noise)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def check_kernel(kernel: str, source: str = "kernel") -> str:
    if kernel not in KERNELS:
        raise ValueError(f"{source}={kernel!r}: expected one of {', '.join(KERNELS)}")
    return kernel


# ---------------------------------------------------------------------------------------------
# The kernels.
# ---------------------------------------------------------------------------------------------


def pad_for_int_mm(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad int8 ``a`` (M, K) and ``b`` (K, N) to M > 16 and K, N multiples of 8.

    CUDA's `torch._int_mm` refuses other shapes; zero rows and columns add nothing to the
    products, so ``torch._int_mm(*pad_for_int_mm(a, b))[:M, :N]`` equals ``a @ b``.
    """
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return a, b


def int_mm(a: Tensor, b: Tensor, pad: bool | None = None) -> Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32, exactly (`torch._int_mm`).

    ``pad``: pad to the shapes CUDA's kernel needs; by default only on CUDA and only when the
    shapes need it (the CPU kernel takes any shape).
    """
    m, n = a.shape[0], b.shape[1]
    if pad is None:
        pad = a.is_cuda and (m <= 16 or a.shape[1] % 8 != 0 or n % 8 != 0)
    if pad:
        a, b = pad_for_int_mm(a, b)
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def fp32_mm(q: Tensor, codes_t: Tensor) -> Tensor:
    """The same integers as `int_mm`, through the fp32 matmul: (M, K) @ (K, N) -> fp32.

    ``q`` and ``codes_t`` may already be integer-valued fp32 (`bitvit.quant.absmax_codes`, a
    layer's cached float codes): no casts then. Exact for weight codes in
    {-1, 0, 1}, ``|q| <= 127`` and ``K <= MAX_EXACT_K`` (see the module docstring).
    """
    k = q.shape[-1]
    if k > MAX_EXACT_K:
        raise ValueError(f"fp32 integer kernel: K={k} > {MAX_EXACT_K}, where fp32 sums of "
                         "codes may round; use the int8 kernel")
    return q.float() @ (codes_t if codes_t.dtype == torch.float32 else codes_t.float())


def int_matmul(q: Tensor, codes_t: Tensor, kernel: str | None = None) -> Tensor:
    """``q`` int8 (M, K) times ``codes_t`` int8 (K, N), exactly, by ``kernel`` (None: the one
    `choose_kernel` picks for ``q``'s device). int32 from ``int8``, fp32 from ``fp32`` (which
    also takes both as integer-valued fp32, see `fp32_mm`)."""
    if kernel is None:
        kernel = choose_kernel(q.device).name
    if kernel == "int8":
        return int_mm(q, codes_t)
    if kernel == "fp32":
        return fp32_mm(q, codes_t)
    raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}")


# ---------------------------------------------------------------------------------------------
# What the CPU can do.
# ---------------------------------------------------------------------------------------------


@cache
def _cpuinfo() -> tuple[str, frozenset[str] | None]:
    """The CPU's model name and its flags (None where /proc/cpuinfo lists none: not x86 Linux)."""
    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():  # the first processor's entries
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    model = model or platform.processor() or platform.machine()
    return model, flags


def cpu_isa() -> dict[str, Any]:
    """What this CPU offers the integer product: torch's CPU capability, the model name, the
    relevant /proc/cpuinfo flags (None where unknown) and the env vars that cap the ISA."""
    model, flags = _cpuinfo()
    info: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "model_name": model}
    for flag in ISA_FLAGS:
        info[flag] = None if flags is None else flag in flags
    for var in ISA_ENV:
        info[var] = os.environ.get(var) or None
    return info


# The x86 levels that matter for an int8 product, in order.
_LEVELS = ("no AVX2", "AVX2", "AVX2 + AVX-VNNI", "AVX-512", "AVX-512 VNNI", "AVX-512 VNNI + AMX")
# ONEDNN_MAX_CPU_ISA values (oneDNN's names) -> the highest level they allow.
_ONEDNN_CAPS = {"SSE41": 0, "AVX": 0, "AVX2": 1, "AVX2_VNNI": 2, "AVX2_VNNI_2": 2,
                "AVX512_CORE": 3, "AVX512_CORE_VNNI": 4, "AVX512_CORE_BF16": 4,
                "AVX512_CORE_FP16": 4, "AVX10_1_512": 4}
_ATEN_CAPS = {"default": 0, "avx2": 1}  # ATen's avx512 is its highest x86 level: no cap


def _hardware_level(isa: dict[str, Any]) -> int:
    if isa["amx_int8"] and isa["avx512_vnni"]:
        return 5
    if isa["avx512_vnni"]:
        return 4
    if isa["avx512f"]:
        return 3
    if isa["avx_vnni"] and isa["avx2"]:
        return 2
    return 1 if isa["avx2"] else 0


def _env_cap(var: str, value: str | None) -> int | None:
    if not value:
        return None
    if var == "ONEDNN_MAX_CPU_ISA":
        name = value.upper()
        return 5 if "AMX" in name else _ONEDNN_CAPS.get(name)
    return _ATEN_CAPS.get(value.lower())


def isa_summary(isa: dict[str, Any] | None = None) -> str:
    """The ISA the integer product runs on, in words: e.g. ``"AVX-512 VNNI + AMX"``, or
    ``"AVX2 (emulated: ONEDNN_MAX_CPU_ISA=AVX2)"`` when env vars cap it below the hardware's."""
    isa = cpu_isa() if isa is None else isa
    if isa["avx2"] is None:  # no x86 flags: name the machine and torch's capability
        return f"{platform.machine()} ({isa['cpu_capability']})"
    hardware = _hardware_level(isa)
    caps = {var: _env_cap(var, isa[var]) for var in ISA_ENV}
    capping = {var: cap for var, cap in caps.items() if cap is not None and cap < hardware}
    if not capping:
        return _LEVELS[hardware]
    settings = ", ".join(f"{var}={isa[var]}" for var in capping)
    return f"{_LEVELS[min(capping.values())]} (emulated: {settings})"


# ---------------------------------------------------------------------------------------------
# The choice.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChoice:
    name: str  # a KERNELS entry
    reason: str  # why, in one line
    isa: str  # isa_summary() for a CPU, the device's name otherwise


_CHOICES: dict[str, KernelChoice] = {}


def choose_kernel(device: str | torch.device = "cpu") -> KernelChoice:
    """The integer kernel for ``device``'s type, decided once per process (see the module
    docstring). A bad ``$BITVIT_INT_KERNEL`` raises ValueError naming it."""
    dev = torch.device(device).type
    choice = _CHOICES.get(dev)
    if choice is None:
        choice = _CHOICES[dev] = _decide(dev)
    return choice


def reset_choice() -> None:
    """Forget the decisions of this process (after changing the env or the thread count)."""
    _CHOICES.clear()


@torch.compiler.assume_constant_result
def kernel_name(device_type: str) -> str:
    """``choose_kernel(device_type).name``, a constant to `torch.compile` (no graph break)."""
    return choose_kernel(device_type).name


def _decide(device_type: str) -> KernelChoice:
    override = os.environ.get(KERNEL_ENV)
    if override:
        check_kernel(override, f"${KERNEL_ENV}")
    if device_type == "cuda":
        return KernelChoice("int8", "CUDA: torch._int_mm", torch.cuda.get_device_name())
    if device_type != "cpu":
        return KernelChoice("int8", f"{device_type}: torch._int_mm (not benchmarked)",
                            device_type)
    isa = isa_summary()
    if override:
        return KernelChoice(override, f"set by ${KERNEL_ENV}={override}", isa)
    return _benchmarked_choice(isa)


def cache_path() -> Path:
    from bitvit.data.download import resolve_cache_dir  # lazy: the data package is heavy

    return resolve_cache_dir() / CACHE_FILE


def _cache_key(isa: str) -> str:
    threads = torch.get_num_threads()
    return f"{_cpuinfo()[0]} | {isa} | torch {torch.__version__} | {threads} threads"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; a missing, unreadable or malformed file is an empty cache."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data["entries"]
        log.warning("kernel cache %s has an unknown layout; measuring again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        log.warning("kernel cache %s unreadable (%s); measuring again", path, e)
    return {}


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("kernel") in KERNELS
            and isinstance(entry.get("int8_speedup"), (int, float)))


def _benchmarked_choice(isa: str) -> KernelChoice:
    from bitvit.rundir import write_text  # lazy: only a measurement writes

    path = cache_path()
    key = _cache_key(isa)
    entries = _read_cache(path)
    entry = entries.get(key)
    where = f"cached {_tilde(path)}"
    if not _valid_entry(entry):
        speedup = benchmark_kernels()
        entry = {"kernel": "int8" if speedup > 1.0 else "fp32",
                 "int8_speedup": round(speedup, 3),
                 "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        entries[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries},
                                        indent=1) + "\n")
            where = f"measured now, saved to {_tilde(path)}"
        except OSError as e:  # an unwritable cache only costs a measurement next time
            log.warning("could not write kernel cache %s: %s", path, e)
            where = "measured now, not cached"
    speedup = entry["int8_speedup"]
    threads = torch.get_num_threads()
    reason = (f"int8 {speedup:.2f}x fp32's speed in a micro-benchmark on {isa}, {threads} "
              f"thread{'s' if threads != 1 else ''} ({where})")
    return KernelChoice(entry["kernel"], reason, isa)


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def _seconds(fn: Callable[..., Tensor], *args: Tensor) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@torch.no_grad()
def benchmark_kernels(shapes: tuple[tuple[int, int, int], ...] = BENCH_SHAPES,
                      budget_s: float = BENCH_BUDGET_S) -> float:
    """int8's speed relative to fp32 on ``shapes`` (> 1: int8 is faster), at the current
    thread count: the geometric mean over shapes of (best fp32 time / best int8 time).

    One warm-up round, then timed rounds, interleaved, until ``budget_s`` is spent (at least
    one, at most MAX_ROUNDS; each kernel's best time counts). A CPU where int8 is several times
    slower stops after the warm-up.
    """
    gen = torch.Generator().manual_seed(0)
    cases = []
    for m, k, n in shapes:
        q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        codes_t = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=gen)
        cases.append((q, codes_t, codes_t.float()))  # fp32: as a layer caches its codes
    best = {("int8", i): math.inf for i in range(len(cases))}
    best.update({("fp32", i): math.inf for i in range(len(cases))})

    def one_round() -> None:
        for i, (q, codes_t, codes_f) in enumerate(cases):
            best["int8", i] = min(best["int8", i], _seconds(int_mm, q, codes_t))
            best["fp32", i] = min(best["fp32", i], _seconds(fp32_mm, q, codes_f))

    def speedup() -> float:
        logs = [math.log(best["fp32", i] / best["int8", i]) for i in range(len(cases))]
        return math.exp(sum(logs) / len(logs))

    one_round()  # warm-up: first calls pay for allocation and kernel selection
    if speedup() < 0.25:  # clearly slower: no need to measure it well
        return speedup()
    best.update(dict.fromkeys(best, math.inf))
    start = time.perf_counter()
    for _ in range(MAX_ROUNDS):
        one_round()
        if time.perf_counter() - start > budget_s:
            break
    return speedup()
