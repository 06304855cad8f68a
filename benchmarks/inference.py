"""Inference throughput: the integer path vs full precision (fp32 and bf16), and file sizes.

For each preset (paper, strong) and batch size (1, 256): images/s of
- ``fp32``: the unquantized ViT in fp32, eager;
- ``bf16``: the same fp32 model under ``torch.autocast("cpu", torch.bfloat16)`` (weights stay fp32;
  autocast recasts them and runs the matmuls in bf16 on every call);
- ``bf16w``: a bf16 copy of the model (weights stored in bf16, bf16 input: no recasting). The
  ``speedup_bf16_*`` keys use whichever of the two bf16 variants is faster, so the integer path
  is compared with the better bf16 baseline;
- ``int``:  the b158 model exported and loaded back with `bitvit.load` (int8 x int8 -> int32
  linears; fp16-stored parameters come back as fp32), eager;
- with ``--compile``, also ``fp32-c`` and ``int-c``: both under ``torch.compile`` (inductor fuses
  LayerNorm with activation quantization and the rescale with bias and GELU).
All in one process on the same inputs, interleaved round by round so drift hits all alike.
Weights are random: speed does not depend on training.

Prints a table and, last, one JSON line (speedups are median over median, paper preset; the
same keys with a ``_strong`` suffix for the strong preset).

    python benchmarks/inference.py [--repeats 20] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitvit import VisionTransformer, ViTConfig, load, quantize_
from bitvit.config import Config
from bitvit.engine import compile_model
from bitvit.export import export_model
from bitvit.quant import QuantConfig

PRESETS = {
    "paper": ViTConfig(patch_size=16, dim=256, depth=6, heads=8, mlp_ratio=4.0),
    "strong": ViTConfig(patch_size=4, dim=192, depth=9, heads=12, mlp_ratio=2.0),
}


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


def export_and_load(model_fp32: torch.nn.Module, model_b158: torch.nn.Module, cfg: ViTConfig,
                    ) -> tuple[torch.nn.Module, int, int]:
    """Export the b158 model, load it back as users do (`bitvit.load`, integer engine).

    Returns (loaded model, exported bytes, fp32 checkpoint bytes).
    """
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in model_fp32.state_dict().items()}, fp32_path)
        out = Path(tmp) / "b158.safetensors"
        config = Config(model=cfg, quant=QuantConfig(method="b158"))
        export_model(model_b158, config, [str(i) for i in range(cfg.num_classes)], out)
        return load(out, engine="int"), out.stat().st_size, fp32_path.stat().st_size


def profile_shares(fn: Callable[[], object], rounds: int = 3) -> list[tuple[str, float]]:
    """Self-CPU share of each op group in ``fn`` (relative shares only: the machine is shared)."""
    from torch.profiler import profile

    groups = {
        "int8 matmul": ("aten::_int_mm",),
        "fp32 matmul": ("aten::addmm", "aten::mm", "aten::linear", "aten::bmm"),
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
    with profile() as prof:
        for _ in range(rounds):
            fn()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        group = next((g for g, names in groups.items() if evt.key in names), "other")
        totals[group] = totals.get(group, 0.0) + evt.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((g, t / whole) for g, t in totals.items()), key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paper,strong")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--profile", action="store_true", help="profile the int model at the "
                    "largest batch: where the remaining time goes")
    ap.add_argument("--no-malloc-tune", action="store_true",
                    help="leave glibc malloc at its defaults (see tune_malloc)")
    args = ap.parse_args()
    tuned = False if args.no_malloc_tune else tune_malloc()
    batches = [int(b) for b in args.batches.split(",")]

    result: dict[str, object] = {
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "repeats": args.repeats, "malloc_tuned": tuned,
        "bf16": "faster of autocast and bf16 weights",
    }
    print(f"inference, CPU, {torch.get_num_threads()} threads, {args.repeats} repeats, "
          f"malloc tuned: {tuned}; images/s (min time -> best, median time -> typical)")
    print(f"{'preset':7} {'batch':>5} {'model':7} {'best img/s':>11} {'median img/s':>13} "
          f"{'speedup':>8}")
    for preset in args.presets.split(","):
        cfg = PRESETS[preset]
        torch.manual_seed(0)
        fp32 = VisionTransformer(cfg).eval()
        bf16_weights = copy.deepcopy(fp32).to(torch.bfloat16)
        b158 = copy.deepcopy(fp32)
        quantize_(b158, "b158")
        int_model, exported_bytes, fp32_bytes = export_and_load(fp32, b158, cfg)
        suffix = "" if preset == "paper" else f"_{preset}"
        result[f"size_ratio_fp32{suffix}"] = round(exported_bytes / fp32_bytes, 4)
        result[f"exported_bytes{suffix}"] = exported_bytes
        result[f"fp32_bytes{suffix}"] = fp32_bytes

        for batch in batches:
            x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
            nullctx = contextlib.nullcontext()
            # name -> (model, context, input)
            models: dict[str, tuple[torch.nn.Module, contextlib.AbstractContextManager,
                                    torch.Tensor]] = {
                "fp32": (fp32, nullctx, x),
                "bf16": (fp32, torch.autocast("cpu", dtype=torch.bfloat16), x),
                "bf16w": (bf16_weights, nullctx, x.to(torch.bfloat16)),
                "int": (int_model, nullctx, x),
            }
            if args.compile:
                with torch.inference_mode():
                    models["fp32-c"] = (compile_model(fp32, x), nullctx, x)
                    models["int-c"] = (compile_model(int_model, x), nullctx, x)

            def run(name: str, models=models) -> None:
                model, ctx, inp = models[name]
                with ctx:
                    model(inp)

            times: dict[str, list[float]] = {name: [] for name in models}
            with torch.inference_mode():
                for name in models:
                    for _ in range(args.warmup):
                        run(name)
                for _ in range(args.repeats):
                    for name in models:
                        t0 = time.perf_counter()
                        run(name)
                        times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["fp32"])
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{preset:7} {batch:5d} {name:7} {batch / min(ts):11.1f} "
                      f"{batch / med:13.1f} {base / med:8.2f}")
                result[f"{name}_img_s_b{batch}{suffix}"] = round(batch / med, 1)
            med_int = statistics.median(times["int"])
            result[f"speedup_fp32_b{batch}{suffix}"] = round(base / med_int, 3)
            med_bf16 = min(statistics.median(times["bf16"]), statistics.median(times["bf16w"]))
            result[f"speedup_bf16_b{batch}{suffix}"] = round(med_bf16 / med_int, 3)
            if args.compile:
                result[f"speedup_compiled_b{batch}{suffix}"] = round(
                    statistics.median(times["fp32-c"]) / statistics.median(times["int-c"]), 3)
                result[f"speedup_int_c_over_fp32_b{batch}{suffix}"] = round(
                    base / statistics.median(times["int-c"]), 3)
        print(f"{preset}: exported b158 {exported_bytes / 1e6:.3f} MB, fp32 checkpoint "
              f"{fp32_bytes / 1e6:.3f} MB, ratio {exported_bytes / fp32_bytes:.4f}")
        if args.profile:
            x = torch.randn(max(batches), 3, cfg.image_size, cfg.image_size)
            with torch.inference_mode():
                shares = profile_shares(lambda x=x, m=int_model: m(x))
            print(f"{preset}: int model, batch {max(batches)}, self-CPU share by op group:")
            for group, share in shares:
                print(f"  {share:6.1%}  {group}")
            result[f"profile_int_b{max(batches)}{suffix}"] = {g: round(s, 3) for g, s in shares}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
