"""Where the time goes, by op: torch's profiler by op group, ONNX Runtime's trace by op type.

Helpers of ``benchmarks/inference.py --profile``: shares of the time (relative only: the
machine may be shared) and the share of matrix products, which bounds what faster matrix
products alone could gain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

# Op groups of the torch profile; the first two are the matrix products.
TORCH_GROUPS = {
    "int8 matmul": ("aten::_int_mm",),
    # On the fp32 kernel (bitvit.nn.kernels) the integer product itself is an fp32 matmul.
    "fp32 matmul (head; integer product on the fp32 kernel)": (
        "aten::addmm", "aten::mm", "aten::linear", "aten::bmm"),
    "act quant (absmax, scale, round, cast)": (
        "aten::amax", "aten::amin", "aten::neg_", "aten::maximum", "aten::clamp_",
        "aten::reciprocal", "aten::div", "aten::round_", "aten::round"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "layernorm": ("aten::native_layer_norm",),
    "gelu": ("aten::gelu",),
    "copies, casts, cat": ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone"),
    "elementwise mul/add (rescale, bias, residual)": (
        "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::addcmul"),
}
TORCH_MATMUL_GROUPS = tuple(TORCH_GROUPS)[:2]
# Matrix-product op types in ONNX Runtime's trace, after its graph optimizations (FusedMatMul:
# a MatMul with a transpose or scale folded in; DynamicQuantizeMatMul quantizes its input
# itself). Attention's two products (QK^T, AV) are MatMul/FusedMatMul too; Softmax is not.
ORT_MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat",
                  "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul", "MatMulNBits")


def profile_shares(fn: Callable[[], object], rounds: int = 3) -> list[tuple[str, float]]:
    """Self-CPU share of each op group in ``fn`` (relative shares only: the machine is shared)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(rounds):
            fn()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        group = next((g for g, names in TORCH_GROUPS.items() if evt.key in names), "other")
        totals[group] = totals.get(group, 0.0) + evt.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((g, t / whole) for g, t in totals.items()), key=lambda r: -r[1])


def ort_op_shares(trace_path: Path, skip_runs: int = 0) -> dict[str, float]:
    """Share of node time by op type in an ONNX Runtime profile trace, largest first.

    Node events (``"cat": "Node"``, ``"ph": "X"``) name their op type in ``args.op_name``; those
    before the start of run ``skip_runs`` (its ``model_run`` event, counting from 0) are
    warm-up and left out.
    """
    try:
        trace = json.loads(trace_path.read_text())
        runs = sorted(e["ts"] for e in trace
                      if e.get("cat") == "Session" and e.get("name") == "model_run")
        start = runs[skip_runs] if skip_runs else float("-inf")
        totals: dict[str, float] = {}
        for e in trace:
            op = e.get("args", {}).get("op_name")
            if e.get("cat") == "Node" and e.get("ph") == "X" and op and e["ts"] >= start:
                totals[op] = totals.get(op, 0) + e["dur"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        why = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        raise ValueError(f"{trace_path}: not an ONNX Runtime profile trace with more than "
                         f"{skip_runs} runs ({why})") from None
    whole = sum(totals.values())
    if not whole:
        raise ValueError(f"{trace_path}: no timed node events (args.op_name) after warm-up")
    return dict(sorted(((op, t / whole) for op, t in totals.items()), key=lambda r: -r[1]))


def top_shares(shares: dict[str, float], n: int = 8) -> dict[str, float]:
    """The ``n`` largest shares, the rest summed as ``other`` (if any), rounded for the JSON."""
    items = list(shares.items())
    top = {k: round(v, 3) for k, v in items[:n]}
    if items[n:]:
        top["other"] = round(sum(v for _, v in items[n:]), 3)
    return top


def free_matmul_bound(fp32_s: float, engine_s: float, matmul_share: float) -> float | None:
    """Speedup over torch fp32 if the engine's matrix products cost nothing.

    fp32 / (engine x (1 - share)). The share is of node time, which is less than the wall time
    it scales, so the bound errs high: a ceiling, not an estimate.
    """
    rest = engine_s * (1.0 - matmul_share)
    return round(fp32_s / rest, 2) if rest > 0 else None


def profile_ort(path: Path, x: torch.Tensor, threads: int, prefix: Path, rounds: int = 3,
                warmup: int = 2) -> dict[str, float]:
    """`ort_op_shares` of the ONNX file at ``path``, in a session built as the timed one's."""
    from bitvit.deploy.onnx_runtime import OrtModel

    traced = OrtModel(path, threads=threads, profile=prefix)
    with torch.inference_mode():
        for _ in range(warmup + rounds):
            traced(x)
    return ort_op_shares(Path(traced.session.end_profiling()), skip_runs=warmup)
