"""Choosing and running the integer product of a quantized layer: int8 activation codes (M, K)
times ternary/binary weight codes (K, N).

Three kernels compute the same, exact, integers:

- ``"int8"``: `torch._int_mm`, int8 x int8 -> int32. Fast where the CPU has AVX512-VNNI or AMX
  (and on CUDA). Elsewhere (e.g. AMD Zen 3, AVX2 only) PyTorch runs it as a scalar loop, 5-30x
  slower than fp32: it calls oneDNN only where cpuinfo reports AVX512-VNNI, a hardware check
  that the ISA-capping env vars (`ISA_ENV`) do not reach, so they cannot emulate that slowness.
- ``"fp32"``: the codes as floats through the fp32 matmul (BLAS). Exact too: an activation code
  has ``|q| <= 127`` (`bitvit.nn.quant.absmax_int8`; 1 for sign activations), a weight code
  ``|w| <= 1``, so every product and every partial sum, in any order, is an integer of magnitude
  at most ``K * 127 < 2**24`` for ``K <= MAX_EXACT_K`` (132,104), and fp32 holds those exactly.
  Even a reduced-precision fp32 matmul (TF32, or bf16 on AMX) holds |q| <= 127 exactly.
- ``"u8s8"``: oneDNN's quantized linear (`torch.ops.onednn.qlinear_pointwise`), unsigned x
  signed int8 with int32 accumulation, for AVX2 CPUs without VNNI: the activations go in as
  ``q + 128`` (uint8, zero point 128, which oneDNN takes off in int32 as 128 x the weight's
  column sums), the codes prepacked once per layer (`pack_codes`), the output fp32 at unit
  scales: the same integers, exact for ``K <= MAX_EXACT_K``. AVX2's u8 x s8 instruction
  (vpmaddubsw) saturates a pair of products at int16, which ternary codes never reach
  (2 * 255 * 1). Inside `torch.compile` the product is the op ``bitvit::u8s8_mm`` (uint8
  activations, int8 codes), which inductor calls as an extern kernel: it finds the layer's
  packed codes from the codes tensor (`packed_for`), packing again only where they changed.

`choose_kernel` decides once per process: CUDA takes ``int8``; on a CPU, ``$BITVIT_INT_KERNEL``
(a `KERNELS` name) decides, else a micro-benchmark of the three (under a second), whose
verdict is cached per machine in ``kernels.json`` in the bitvit cache folder (``$BITVIT_CACHE``,
else ``~/.cache/bitvit``), keyed by CPU model, ISA (`isa_summary`), torch version and thread
count. `int_matmul` runs a kernel; its int32 or fp32 result gives identical values in
`bitvit.nn.quant.rescale`.
"""

from __future__ import annotations

import math
import os
import platform
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("int8", "fp32", "u8s8")
KERNEL_ENV = "BITVIT_INT_KERNEL"
CACHE_FILE = "kernels.json"
CACHE_VERSION = 2  # 2: a speed per kernel (u8s8 joined)
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


def _check_exact_k(k: int, kernel: str) -> None:
    if k > MAX_EXACT_K:
        raise ValueError(f"{kernel} integer kernel: K={k} > {MAX_EXACT_K}, where its fp32 sums "
                         "of codes may round; use the int8 kernel")


def fp32_mm(q: Tensor, codes_t: Tensor) -> Tensor:
    """The same integers as `int_mm`, through the fp32 matmul: (M, K) @ (K, N) -> fp32.

    ``q`` and ``codes_t`` may already be integer-valued fp32 (`bitvit.nn.quant.absmax_codes`, a
    layer's cached float codes): no casts then. Exact for weight codes in
    {-1, 0, 1}, ``|q| <= 127`` and ``K <= MAX_EXACT_K`` (see the module docstring).
    """
    _check_exact_k(q.shape[-1], "fp32")
    return q.float() @ (codes_t if codes_t.dtype == torch.float32 else codes_t.float())


@cache
def u8s8_available() -> bool:
    """Whether this PyTorch build has oneDNN's quantized linear, which ``u8s8`` runs on."""
    try:
        torch.ops.onednn.qlinear_prepack  # noqa: B018 - raises where the op is not registered
        torch.ops.onednn.qlinear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _require_u8s8() -> None:
    if not u8s8_available():
        raise RuntimeError("u8s8 integer kernel: this PyTorch build lacks oneDNN's quantized "
                           "linear (torch.ops.onednn.qlinear_pointwise)")


def _version(t: Tensor) -> int | None:
    # Inference tensors (made under torch.inference_mode) keep no version counter.
    return None if t.is_inference() else t._version


def _prepack(codes_t: Tensor) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(codes_t.t().to(torch.int8).contiguous(), None)


class PackedCodes:
    """Weight codes prepacked for the ``u8s8`` kernel (`pack_codes`).

    ``current()`` packs again, in place, where the codes changed since (their version counter
    moved: an in-place write, such as ``load_state_dict``'s copy); codes made under
    ``torch.inference_mode`` keep no version counter, and count as unchanged.
    """

    def __init__(self, codes_t: Tensor) -> None:
        _require_u8s8()
        n = codes_t.shape[1]
        self.codes_t = codes_t  # the int8 (K, N) codes it packs, as given (a view: no copy)
        self.ones = torch.ones(n)  # (N,) fp32 weight scales of 1: the output holds the integers
        self.zeros = torch.zeros(n, dtype=torch.long)  # (N,) weight zero points
        self.version = _version(codes_t)
        self.weight = _prepack(codes_t)  # oneDNN's layout: an opaque MKLDNN tensor (no storage)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def current(self) -> PackedCodes:
        """This packing, packed again first if the codes changed since."""
        version = _version(self.codes_t)
        if version != self.version:
            self.version, self.weight = version, _prepack(self.codes_t)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles pack again from the codes (the packed tensor has no storage).
        return pack_codes, (self.codes_t,)


# The live packings of `pack_codes`, by their codes' address, shape, strides and dtype: how the
# compiled graph's u8s8 op (`_u8s8_op`) finds a layer's packed weight from its codes alone.
# Weak: an entry lives as long as its holder (an InferenceLinear's ``packed``). A packing holds
# its codes, so while its entry lives no other tensor can take their address.
_PACKED: weakref.WeakValueDictionary[tuple[Any, ...], PackedCodes] = (
    weakref.WeakValueDictionary())


def _codes_key(codes_t: Tensor) -> tuple[Any, ...]:
    return codes_t.data_ptr(), codes_t.shape, codes_t.stride(), codes_t.dtype


def pack_codes(codes_t: Tensor) -> PackedCodes:
    """Prepack int8 weight codes (K, N) for `u8s8_mm`: once per layer (about 0.5 ms for
    256 x 1024 on one AVX2 core), or per call where the weights change (training). The packing
    is registered under its codes, for `packed_for` (while it lives)."""
    packed = PackedCodes(codes_t)
    _PACKED[_codes_key(codes_t)] = packed
    return packed


def packed_for(codes_t: Tensor) -> PackedCodes:
    """The live packing of ``codes_t`` by `pack_codes` (current: see `PackedCodes.current`),
    or, where there is none (training's new codes every step), a packing made now."""
    packed = _PACKED.get(_codes_key(codes_t))
    return packed.current() if packed is not None else PackedCodes(codes_t)


def _qlinear(u: Tensor, packed: PackedCodes) -> Tensor:
    """oneDNN's u8 x s8 product of uint8 ``u`` = q + 128 (zero point 128) and the packed codes,
    at unit scales: fp32 (M, N) holding the integers q @ codes."""
    return torch.ops.onednn.qlinear_pointwise(
        u, 1.0, 128, packed.weight, packed.ones, packed.zeros, None, 1.0, 0, torch.float32,
        "none", [], "")


@torch.library.custom_op("bitvit::u8s8_mm", mutates_args=(), device_types="cpu")
def _u8s8_op(u: Tensor, codes_t: Tensor) -> Tensor:
    """`_qlinear` as an op that `torch.compile` can trace: it takes the codes, a plain tensor
    (inductor rejects oneDNN's opaque packed one), and finds their packing (`packed_for`).
    Inductor calls it as an extern kernel and fuses the passes around it."""
    return _qlinear(u.contiguous(), packed_for(codes_t))


@_u8s8_op.register_fake
def _(u: Tensor, codes_t: Tensor) -> Tensor:
    return u.new_empty((u.shape[0], codes_t.shape[1]), dtype=torch.float32)


def u8s8_mm(q: Tensor, codes: PackedCodes | Tensor) -> Tensor:
    """The same integers as `int_mm` by oneDNN's u8 x s8 product: int8 ``q`` (M, K) times
    ``codes`` (prepacked, or int8 (K, N): their live packing, else packed now) -> fp32. See
    the module docstring."""
    _check_exact_k(q.shape[-1], "u8s8")
    # q + 128 as uint8 is q's two's-complement bits with the sign bit flipped: one cheap pass
    # (ATen's float -> uint8 cast is several times slower than to int8).
    u = q.to(torch.int8).view(torch.uint8) ^ 128
    if torch.compiler.is_compiling():
        # The graph holds the codes; the op finds their packing when it runs.
        return _u8s8_op(u, codes.codes_t if isinstance(codes, PackedCodes) else codes)
    # Eager: straight to oneDNN (a custom op's dispatch costs a few microseconds a call).
    return _qlinear(u, codes.current() if isinstance(codes, PackedCodes) else packed_for(codes))


def int_matmul(q: Tensor, codes_t: Tensor | PackedCodes, kernel: str | None = None) -> Tensor:
    """``q`` int8 (M, K) times ``codes_t`` int8 (K, N), exactly, by ``kernel`` (None: the one
    `choose_kernel` picks for ``q``'s device). int32 from ``int8``, fp32 from the others:
    ``fp32`` also takes both as integer-valued fp32 (see `fp32_mm`), ``u8s8`` the codes
    prepacked (`pack_codes`)."""
    if kernel is None:
        kernel = choose_kernel(q.device).name
    if kernel == "int8":
        return int_mm(q, codes_t)
    if kernel == "fp32":
        return fp32_mm(q, codes_t)
    if kernel == "u8s8":
        return u8s8_mm(q, codes_t)
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
    from bitvit.files import EnvError

    override = os.environ.get(KERNEL_ENV)
    if override and override not in KERNELS:
        raise EnvError(f"${KERNEL_ENV}={override!r}: expected one of {', '.join(KERNELS)}")
    if device_type == "cuda":
        return KernelChoice("int8", "CUDA: torch._int_mm", torch.cuda.get_device_name())
    if device_type != "cpu":
        return KernelChoice("int8", f"{device_type}: torch._int_mm (not benchmarked)",
                            device_type)
    isa = isa_summary()
    if override == "u8s8" and not u8s8_available():
        raise EnvError(f"${KERNEL_ENV}=u8s8: this PyTorch build lacks oneDNN's quantized "
                         "linear (torch.ops.onednn.qlinear_pointwise)")
    if override:
        return KernelChoice(override, f"set by ${KERNEL_ENV}={override}", isa)
    return _benchmarked_choice(isa)


def cache_path() -> Path:
    from bitvit.files import resolve_cache_dir

    return resolve_cache_dir() / CACHE_FILE


def _cache_key(isa: str) -> str:
    threads = torch.get_num_threads()
    return f"{_cpuinfo()[0]} | {isa} | torch {torch.__version__} | {threads} threads"


def _valid_entry(entry: Any) -> bool:
    if not (isinstance(entry, dict) and entry.get("kernel") in KERNELS
            and isinstance(entry.get("speed"), dict)):
        return False
    speed = entry["speed"]
    # Ratios of a sane measurement: 10**400 in a hand-edited file would overflow the message.
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6
                for v in speed.values())
            and (entry["kernel"] == "fp32" or entry["kernel"] in speed))


def _benchmarked_choice(isa: str) -> KernelChoice:
    from bitvit.files import read_cache, save_cache, tilde

    path = cache_path()
    key = _cache_key(isa)
    entries = read_cache(path, CACHE_VERSION, "kernel cache")
    entry = entries.get(key)
    where = f"cached {tilde(path)}"
    if not _valid_entry(entry):
        speed = {name: round(v, 3) for name, v in benchmark_kernels().items()}
        fastest = max({"fp32": 1.0, **speed}.items(), key=lambda kv: kv[1])[0]  # ties: fp32
        entry = {"kernel": fastest, "speed": speed,
                 "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        entries[key] = entry
        where = save_cache(path, CACHE_VERSION, entries, "kernel cache")
    threads = torch.get_num_threads()
    speeds = ", ".join(f"{name} {v:.2f}x" for name, v in
                       sorted(entry["speed"].items(), key=lambda kv: -kv[1]))
    reason = (f"the fastest in a micro-benchmark on {isa}, {threads} "
              f"thread{'s' if threads != 1 else ''}: {speeds} fp32's speed ({where})")
    return KernelChoice(entry["kernel"], reason, isa)


def _seconds(fn: Callable[..., Tensor], *args: Tensor) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@torch.no_grad()
def benchmark_kernels(shapes: tuple[tuple[int, int, int], ...] = BENCH_SHAPES,
                      budget_s: float = BENCH_BUDGET_S) -> dict[str, float]:
    """The speed of ``int8`` and ``u8s8`` (where available) relative to ``fp32`` on ``shapes``
    (> 1: faster), at the current thread count: per kernel, the geometric mean over shapes of
    (best fp32 time / best time of the kernel).

    Each kernel gets its inputs as a layer holds them (fp32: float codes; u8s8: the codes
    prepacked, untimed). One warm-up round, then timed rounds, interleaved, until ``budget_s``
    is spent (at least one, at most MAX_ROUNDS; each kernel's best time counts). A kernel
    several times slower than fp32 in the warm-up sits the timed rounds out.
    """
    gen = torch.Generator().manual_seed(0)
    runs: dict[str, list[tuple[Callable[..., Tensor], tuple[Any, ...]]]] = {
        "fp32": [], "int8": [], "u8s8": []}
    for m, k, n in shapes:
        q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        codes_t = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=gen)
        runs["fp32"].append((fp32_mm, (q.float(), codes_t.float())))
        runs["int8"].append((int_mm, (q, codes_t)))
        if u8s8_available():
            runs["u8s8"].append((u8s8_mm, (q, pack_codes(codes_t))))
    runs = {name: cases for name, cases in runs.items() if cases}
    best = {name: [math.inf] * len(shapes) for name in runs}

    def one_round(names: list[str]) -> None:
        for i in range(len(shapes)):
            for name in names:
                fn, args = runs[name][i]
                best[name][i] = min(best[name][i], _seconds(fn, *args))

    def speeds() -> dict[str, float]:
        fp32 = best["fp32"]
        return {name: math.exp(sum(math.log(f / t) for f, t in zip(fp32, times, strict=True))
                               / len(shapes))
                for name, times in best.items() if name != "fp32"}

    one_round(list(runs))  # warm-up: first calls pay for allocation and kernel selection
    timed = ["fp32"] + [name for name, v in speeds().items() if v >= 0.25]
    if len(timed) == 1:  # every other kernel clearly slower: no need to measure it well
        return speeds()
    for name in timed:
        best[name] = [math.inf] * len(shapes)
    start = time.perf_counter()
    for _ in range(MAX_ROUNDS):
        one_round(timed)
        if time.perf_counter() - start > budget_s:
            break
    return speeds()
