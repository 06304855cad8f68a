"""Inference throughput of every engine, in one process, and file sizes: the whole matrix.

For each preset (paper, strong) and batch size (1, 256): images/s of
- ``fp32``: the unquantized ViT in fp32, torch eager (the baseline of every ``speedup`` key);
- ``bf16``: the same fp32 model under ``torch.autocast("cpu", torch.bfloat16)`` (weights stay
  fp32; autocast recasts them and runs the matmuls in bf16 on every call);
- ``bf16w``: a bf16 copy of the model (weights stored in bf16, bf16 input: no recasting);
- ``int``: the b158 model exported and loaded back with `bitvit.load` (int8 x int8 -> int32
  linears), eager; ``int-c``: the same under `bitvit.deploy.engine.compile_model` (inductor fuses
  LayerNorm with activation quantization, the rescale with bias and GELU), compiled per batch;
- ``fp``: the exported b158 model loaded with ``engine="fp"`` (fake-quant on fp32 weights);
- ``ort-fp32``: ONNX Runtime on the unquantized model as an fp32 ONNX graph;
- ``ort-int8``: ONNX Runtime on that graph after ``onnxruntime.quantization.quantize_dynamic``
  (QInt8 weights, activations quantized per call): the standard int8 deployment to beat;
- ``ort-token`` / ``ort-tensor``: bitvit's ONNX export of the b158 model
  (`bitvit.deploy.onnx_export.to_onnx`, per-token or per-tensor activation scales) under ONNX
  Runtime;
- ``auto``: the exported b158 model loaded with `bitvit.load`'s default, ``engine="auto"``:
  the engine it picks on this machine (int, fp or ONNX Runtime on the per-token graph, built in
  memory; measured once and cached, `bitvit.deploy.auto`), what a user gets by default; its
  choice and why are in the record (``auto_engine``, ``auto_engine_reason``);
- ``fp32-c`` (only with ``--compile`` or named in ``--engines``): the fp32 model compiled.
Every engine gets the same thread count (``--threads``: torch's intra-op threads and ONNX
Runtime's ``intra_op_num_threads`` alike). All run on the same inputs, interleaved round by
round, so that drift on the machine hits all alike. Weights are random: speed does not depend
on training. An engine that fails to build or run is reported as failed, and the rest go on.

Under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` torch and oneDNN run as on an AVX2
CPU, but ONNX Runtime does not: its kernels dispatch on the CPU's own flags. The ``ort-*`` rows
then run the hardware's ISA (``hardware_isa``); they are printed, with a note, and left out of
the speedup keys (``ort_in_speedups: false``).

Prints a header line (command, commit, date, CPU, threads, ISA, the integer kernel chosen and
why), a table and, last, one JSON line. ``speedup_fp32_b*``: the best bitvit engine (int,
int-c, ort-token, ort-tensor) over torch fp32 eager, median over median, paper preset;
``speedup_ort_int8_b*``: the same best over ``ort-int8``; ``auto_speedup_fp32_b*``: the auto
engine over torch fp32 eager (null where auto runs ONNX Runtime under ISA caps); the same keys
with a ``_strong`` suffix for the strong preset.

``--profile`` (at the largest batch; helpers in ``benchmarks/op_profile.py``): the int model's
self-CPU share by op group (``profile_int_b*``), the share of matrix products in it and in torch
fp32 (``matmul_share_int_b*``, ``matmul_share_fp32_b*``) and, for each ONNX Runtime engine
timed, the share of its traced node time by op type (``profile_ort-*_b*``: the largest, the rest
as ``other``), its matrix products' share (``matmul_share_ort-*_b*``) and the speedup over
torch fp32 it could reach at most if they cost nothing (``bound_free_matmul_ort-*_b*``: fp32's
median time over the engine's median time x (1 - that share); null under ISA caps).

    PYTHONPATH=src python benchmarks/inference.py [--repeats 20] [--threads 2] [--profile]
        [--compile] [--presets paper,strong] [--batches 1,256] [--engines fp32,int,...]
        [--out FILE]

The records (on a quiet machine; each record's first line is the command that made it, with
commit, date, CPU and ISA), e.g. the per-CPU paper-preset records:

    PYTHONPATH=src python benchmarks/inference.py --presets paper --repeats 10 \
        --out benchmarks/results/inference-spr-paper.txt

``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` caps torch and oneDNN at AVX2 (the header's
ISA says so), but does not reproduce a real AVX2 CPU (ONNX Runtime ignores it, and `_int_mm`
stays fast): record on one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import (
    Record,
    command_line,
    cpu_model,
    git_commit,
    kernel_info,
    one_line,
    parse_list,
    tune_malloc,
)
from op_profile import (
    ORT_MATMUL_OPS,
    TORCH_MATMUL_GROUPS,
    free_matmul_bound,
    profile_ort,
    profile_shares,
    top_shares,
)
from safetensors.torch import save_file

from bitvit import VisionTransformer, ViTConfig, load, quantize_
from bitvit.data import DataConfig
from bitvit.deploy.engine import cls_token_last_block, compile_model
from bitvit.deploy.export import export_model
from bitvit.nn.quant import QuantConfig
from bitvit.training.config import Config

PRESETS = {
    "paper": ViTConfig(patch_size=16, dim=256, depth=6, heads=8, mlp_ratio=4.0),
    "strong": ViTConfig(patch_size=4, dim=192, depth=9, heads=12, mlp_ratio=2.0),
}
ENGINES = ("fp32", "bf16", "bf16w", "int", "int-c", "fp", "ort-fp32", "ort-int8", "ort-token",
           "ort-tensor", "auto", "fp32-c")
DEFAULT_ENGINES = tuple(e for e in ENGINES if e != "fp32-c")
# bitvit's deployable engines: the "best bitvit engine" of the speedup keys is one of these
# (auto runs one of them, so it is not a candidate of its own).
BITVIT_ENGINES = ("int", "int-c", "ort-token", "ort-tensor")
ONNX_FILES = {"ort-fp32": "fp32.onnx", "ort-int8": "int8.onnx", "ort-token": "b158-token.onnx",
              "ort-tensor": "b158-tensor.onnx"}
Call = Callable[[], object]


def key_suffix(preset: str) -> str:
    """The JSON keys' suffix of a preset: none for the paper preset, ``_strong`` for strong."""
    return "" if preset == "paper" else f"_{preset}"


# ---------------------------------------------------------------------------------------------
# Building the engines of one preset.
# ---------------------------------------------------------------------------------------------


class PresetModels:
    """Every model of one preset, built once; ``failed`` maps an engine to why it cannot run."""

    def __init__(self, cfg: ViTConfig, engines: list[str], threads: int, tmp: Path,
                 record: Record) -> None:
        self.cfg, self.engines, self.threads = cfg, engines, threads
        self.failed: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.ort: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        torch.manual_seed(0)
        self.fp32_plain = VisionTransformer(cfg).eval()  # exported (ONNX, sizes) as it is
        # The torch baselines skip what no output reads, as every bitvit engine and ONNX graph
        # does: the last block's patch tokens (records before 2026-12-07 ran them whole).
        self.fp32 = cls_token_last_block(copy.deepcopy(self.fp32_plain))
        self.bf16w = copy.deepcopy(self.fp32).to(torch.bfloat16)
        self.b158 = copy.deepcopy(self.fp32_plain).eval()
        quantize_(self.b158, "b158")
        fp32_path, b158_path = tmp / "fp32.safetensors", tmp / "b158.safetensors"
        save_file({k: v.contiguous() for k, v in self.fp32_plain.state_dict().items()},
                  fp32_path)
        # Normalization numbers an export must carry (CIFAR-10's; speed does not depend on them).
        data = DataConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
        config = Config(model=cfg, quant=QuantConfig(method="b158"), data=data)
        export_model(self.b158, config, [str(i) for i in range(cfg.num_classes)], b158_path)
        self.sizes["fp32_bytes"] = fp32_path.stat().st_size
        self.sizes["exported_bytes"] = b158_path.stat().st_size
        self.int_model = load(b158_path, engine="int")
        self.fp_model = load(b158_path, engine="fp") if "fp" in engines else None
        self.auto_model = None
        if "auto" in engines:
            try:  # what bitvit.load gives by default (measured now, or the cached verdict)
                self.auto_model = load(b158_path)
            except Exception as err:  # noqa: BLE001 - a failed engine is a result, not a crash
                self.failed["auto"] = f"build: {one_line(err)}"
        if any(e.startswith("ort-") for e in engines):
            self._build_onnx(tmp, record)

    def _build_onnx(self, tmp: Path, record: Record) -> None:
        wanted = [e for e in self.engines if e.startswith("ort-")]
        try:
            from bitvit.deploy.onnx_export import to_onnx
            from bitvit.deploy.onnx_runtime import OrtModel
        except ImportError as err:
            why = f"bitvit.deploy.onnx_export/onnx_runtime unavailable ({one_line(err)})"
            record.print(f"note: skipping {', '.join(wanted)}: {why}")
            self.failed.update(dict.fromkeys(wanted, why))
            return
        paths = {e: tmp / ONNX_FILES[e] for e in wanted}
        steps: dict[str, Callable[[], object]] = {
            "ort-fp32": lambda: to_onnx(self.fp32_plain, paths["ort-fp32"]),
            "ort-int8": lambda: self._quantize_dynamic(to_onnx, tmp / ONNX_FILES["ort-fp32"],
                                                       paths["ort-int8"]),
            "ort-token": lambda: to_onnx(self.b158, paths["ort-token"], act_quant="token"),
            "ort-tensor": lambda: to_onnx(self.b158, paths["ort-tensor"], act_quant="tensor"),
        }
        for engine in wanted:
            try:
                steps[engine]()
                self.sizes[f"onnx_{engine.removeprefix('ort-')}_bytes"] = paths[engine].stat(
                    ).st_size
                self.ort[engine] = OrtModel(paths[engine], threads=self.threads)
            except Exception as err:  # noqa: BLE001 - a failed engine is a result, not a crash
                self.failed[engine] = f"build: {one_line(err)}"

    def _quantize_dynamic(self, to_onnx: Callable, fp32_path: Path, out: Path) -> None:
        """ORT's recipe: pre-process (shape inference, graph cleanup), then QInt8 weights."""
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not fp32_path.exists():  # ort-int8 asked for without ort-fp32
            to_onnx(self.fp32_plain, fp32_path)
        source = fp32_path.with_name("fp32-pre.onnx")
        # Both write temporaries into the working directory (and leave them when they fail).
        with contextlib.chdir(fp32_path.parent):
            try:
                quant_pre_process(fp32_path, source)
            except Exception:  # noqa: BLE001 - it only helps; quantize the plain graph then
                source = fp32_path
            quantize_dynamic(source, out, weight_type=QuantType.QInt8)

    def calls(self, x: torch.Tensor) -> tuple[dict[str, Call], dict[str, str]]:
        """Engine -> a no-argument call that runs it on ``x``, and the engines that failed to
        build for this batch (compiling is per batch size) with why."""
        calls: dict[str, Call] = {}
        failed = {e: why for e, why in self.failed.items() if e in self.engines}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        x_bf16 = x.to(torch.bfloat16)
        for engine in self.engines:
            if engine in self.failed:
                continue
            if engine == "fp32":
                calls[engine] = lambda: self.fp32(x)
            elif engine == "bf16":
                calls[engine] = lambda: _under(autocast, self.fp32, x)
            elif engine == "bf16w":
                calls[engine] = lambda: self.bf16w(x_bf16)
            elif engine == "int":
                calls[engine] = lambda: self.int_model(x)
            elif engine == "fp":
                calls[engine] = lambda: self.fp_model(x)
            elif engine == "auto":
                calls[engine] = lambda: self.auto_model(x)
            elif engine in ("int-c", "fp32-c"):
                model = self.int_model if engine == "int-c" else self.fp32
                compiled = compiled_or_why(model, x)
                if isinstance(compiled, str):
                    failed[engine] = compiled
                else:
                    calls[engine] = lambda m=compiled: m(x)
            else:
                calls[engine] = lambda s=self.ort[engine]: s(x)
        return calls, failed


def _under(ctx: contextlib.AbstractContextManager, model: torch.nn.Module,
           x: torch.Tensor) -> torch.Tensor:
    with ctx:
        return model(x)


def compiled_or_why(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module | str:
    """The model compiled for this batch shape, or why compiling failed.

    `compile_model` falls back to eager with a warning; here that is a failure to report, not
    an eager model to time under the compiled name. ``dynamic=False``: one graph per batch size
    (dynamo would otherwise turn the second size into a slower dynamic-shape graph).
    """
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        compiled = compile_model(model, x, dynamic=False)
    if compiled is model:
        why = next((str(w.message) for w in caught if "compile" in str(w.message)), "")
        return f"compile: {why.splitlines()[0][:160] if why else 'fell back to eager'}"
    return compiled


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def time_interleaved(calls: dict[str, Call], repeats: int, warmup: int,
                     ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of each engine over ``repeats`` rounds of one call each.

    An engine that raises (in warm-up or a round) is dropped with the reason; the others go on.
    """
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for name, call in calls.items():
            try:
                for _ in range(warmup):
                    call()
            except Exception as err:  # noqa: BLE001
                failed[name] = f"run: {one_line(err)}"
        names = list(calls)
        for round_ in range(repeats):
            # Each round starts one engine further on, so that no engine always follows the same
            # one (whose threads may still be spinning down, or whose memory is still in cache).
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                call = calls[name]
                if name in failed:
                    continue
                try:
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
                except Exception as err:  # noqa: BLE001
                    failed[name] = f"run: {one_line(err)}"
    return {k: v for k, v in times.items() if k not in failed and v}, failed


def summarize(batch: int, times: dict[str, list[float]], suffix: str, with_ort: bool = True,
              auto_engine: str | None = None) -> dict[str, object]:
    """The JSON keys of one (preset, batch): img/s per engine and the speedups.

    ``with_ort=False`` (torch's ISA capped, ONNX Runtime's not): the best bitvit engine is
    chosen among the torch ones, nothing is compared with ``ort-int8``, and the auto engine's
    speedup only where it runs a torch engine (``auto_engine``).
    """
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out: dict[str, object] = {f"{name}_img_s_b{batch}{suffix}": round(batch / m, 1)
                              for name, m in med.items()}
    pool = [e for e in BITVIT_ENGINES if with_ort or not e.startswith("ort-")]
    bitvit = {name: m for name, m in med.items() if name in pool}
    best = min(bitvit, key=bitvit.get) if bitvit else None
    out[f"best_engine_b{batch}{suffix}"] = best

    def over(baseline: str | None) -> float | None:
        if best is None or baseline not in med:
            return None
        return round(med[baseline] / med[best], 3)

    out[f"speedup_fp32_b{batch}{suffix}"] = over("fp32")
    out[f"speedup_ort_int8_b{batch}{suffix}"] = over("ort-int8" if with_ort else None)
    bf16 = [n for n in ("bf16", "bf16w") if n in med]
    out[f"speedup_bf16_b{batch}{suffix}"] = over(min(bf16, key=med.get) if bf16 else None)
    auto_ok = "auto" in med and "fp32" in med and (with_ort or auto_engine != "ort")
    out[f"auto_speedup_fp32_b{batch}{suffix}"] = (
        round(med["fp32"] / med["auto"], 3) if auto_ok else None)
    return out


def report_profiles(models: PresetModels, times: dict[str, list[float]], batch: int,
                    preset: str, tmp: Path, with_ort: bool, record: Record,
                    ) -> dict[str, object]:
    """``--profile`` at one (preset, batch): where the time of torch int, torch fp32 and each
    timed ONNX Runtime engine goes, and the speedup bound free matrix products would give."""
    suffix = key_suffix(preset)
    out: dict[str, object] = {}
    x = torch.randn(batch, 3, models.cfg.image_size, models.cfg.image_size)
    with torch.inference_mode():
        shares = profile_shares(lambda: models.int_model(x))
        fp32_shares = dict(profile_shares(lambda: models.fp32(x)))
    record.print(f"{preset}: int model, batch {batch}, self-CPU share by op group:")
    for group, share in shares:
        record.print(f"  {share:6.1%}  {group}")
    out[f"profile_int_b{batch}{suffix}"] = {g: round(s, 3) for g, s in shares}
    for name, groups in (("int", dict(shares)), ("fp32", fp32_shares)):
        out[f"matmul_share_{name}_b{batch}{suffix}"] = round(
            sum(groups.get(g, 0.0) for g in TORCH_MATMUL_GROUPS), 3)
    record.print(f"{preset}: torch fp32, batch {batch}: matrix products (aten addmm, mm, bmm) "
                 f"{out[f'matmul_share_fp32_b{batch}{suffix}']:.1%} of self-CPU time, attention "
                 f"(SDPA) {fp32_shares.get('attention (SDPA)', 0.0):.1%}")
    fp32_s = statistics.median(times["fp32"]) if "fp32" in times else None
    for engine in [e for e in models.ort if e in times]:
        key = f"{engine}_b{batch}{suffix}"
        try:
            ops = profile_ort(models.ort[engine].path, x, models.threads, tmp / f"prof-{engine}")
        except Exception as err:  # noqa: BLE001 - a failed profile is reported, the rest go on
            record.print(f"{preset}: {engine}, batch {batch}: profile failed: {one_line(err)}")
            out.update({f"profile_{key}": None, f"matmul_share_{key}": None,
                        f"bound_free_matmul_{key}": None})
            continue
        matmul = sum(s for op, s in ops.items() if op in ORT_MATMUL_OPS)
        engine_s = statistics.median(times[engine])
        bound = free_matmul_bound(fp32_s, engine_s, matmul) if fp32_s and with_ort else None
        out.update({f"profile_{key}": top_shares(ops), f"matmul_share_{key}": round(matmul, 3),
                    f"bound_free_matmul_{key}": bound})
        record.print(f"{preset}: {engine}, batch {batch}, share of ONNX Runtime node time by op "
                     f"type:")
        for op, share in top_shares(ops).items():
            record.print(f"  {share:6.1%}  {op}")
        named = ", ".join(op for op in ops if op in ORT_MATMUL_OPS)
        timed = f"{fp32_s / engine_s:.2f}x" if fp32_s else "-"
        record.print(f"  matrix products ({named}) {matmul:.1%}: if they cost nothing, at most "
                     f"{bound}x torch fp32 (timed: {timed})" if bound else
                     f"  matrix products ({named}) {matmul:.1%}")
    return out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paper,strong", help=f"of {', '.join(PRESETS)}")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                    help=f"subset of {', '.join(ENGINES)} (default all but fp32-c)")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for every engine (torch intra-op, ORT intra_op_num_threads)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="also time fp32-c, the fp32 model compiled (int-c is in the default set)")
    ap.add_argument("--out", type=Path, help="also write the whole printed record here")
    ap.add_argument("--profile", action="store_true", help="at the largest batch, profile "
                    "torch int and fp32 and each ONNX Runtime engine: where the time goes")
    ap.add_argument("--no-malloc-tune", action="store_true",
                    help="leave glibc malloc at its defaults (see tune_malloc)")
    args = ap.parse_args(argv)
    try:
        args.presets = parse_list(args.presets, tuple(PRESETS), "presets")
        args.engines = parse_list(args.engines, ENGINES, "engines")
        if args.compile and "fp32-c" not in args.engines:
            args.engines.append("fp32-c")
        args.batches = [int(b) for b in parse_list(args.batches, None, "batches")]
        if min(args.batches) < 1 or args.threads < 1 or args.repeats < 1 or args.warmup < 0:
            raise ValueError("--batches, --threads and --repeats must be >= 1, --warmup >= 0")
    except ValueError as err:
        ap.error(str(err).replace("invalid literal for int() with base 10", "--batches: "
                                  "expected integers, got"))
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else tune_malloc()
    record = Record()
    machine = kernel_info()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = git_commit()
    record.print(f"# {command_line()}   (commit {commit}, {date}, CPU {cpu_model()}, "
                 f"{args.threads} threads, ISA {machine['isa']}, kernel {machine['kernel']}: "
                 f"{machine['kernel_reason']})")
    result: dict[str, object] = {
        **machine, "command": command_line(), "commit": commit, "date": date,
        "threads": args.threads, "cpu": cpu_model(), "torch": torch.__version__,
        "repeats": args.repeats, "malloc_tuned": tuned, "engines": args.engines,
        "bf16": "faster of autocast and bf16 weights", "failed": {},
    }
    with contextlib.suppress(ImportError):
        import onnxruntime
        result["onnxruntime"] = onnxruntime.__version__
    # ONNX Runtime's kernels (MLAS) dispatch on CPUID and ignore ATEN_CPU_CAPABILITY and
    # ONEDNN_MAX_CPU_ISA: under an emulated ISA its rows run the hardware's, so they are shown
    # but kept out of the speedup keys, which would otherwise compare two different ISAs.
    ort_comparable = machine.get("hardware_isa", machine["isa"]) == machine["isa"]
    result["ort_in_speedups"] = ort_comparable
    if not ort_comparable and any(e.startswith("ort-") for e in args.engines):
        record.print(f"note: ONNX Runtime ignores the ISA caps: the ort-* rows run "
                     f"{machine['hardware_isa']}; the speedup keys compare torch engines only")
    for preset in ("paper", "strong"):  # the contract keys exist (null) even when not measured
        suffix = key_suffix(preset)
        for key in ("size_ratio_fp32", "best_engine_b1", "best_engine_b256", "speedup_fp32_b1",
                    "speedup_fp32_b256", "speedup_ort_int8_b256", "auto_engine",
                    "auto_speedup_fp32_b1", "auto_speedup_fp32_b256"):
            result[f"{key}{suffix}"] = None
    record.print(f"inference, CPU, {args.threads} threads, {args.repeats} repeats, malloc tuned: "
                 f"{tuned}; images/s (min time -> best, median time -> typical); vs fp32: "
                 f"median over median")
    record.print(f"{'preset':7} {'batch':>5} {'engine':10} {'best img/s':>11} "
                 f"{'median img/s':>13} {'vs fp32':>8}")
    failed: dict[str, str] = result["failed"]  # type: ignore[assignment]
    for preset in args.presets:
        cfg = PRESETS[preset]
        suffix = key_suffix(preset)
        last_times = None
        with tempfile.TemporaryDirectory() as tmp:
            models = PresetModels(cfg, args.engines, args.threads, Path(tmp), record)
            auto = models.auto_model
            if auto is not None:
                result[f"auto_engine{suffix}"] = auto.engine
                result[f"auto_engine_reason{suffix}"] = auto.engine_reason
                record.print(f"{preset}: auto runs {auto.engine} ({auto.engine_reason})")
            for batch in args.batches:
                x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
                calls, build_failed = models.calls(x)
                times, run_failed = time_interleaved(calls, args.repeats, args.warmup)
                base = statistics.median(times["fp32"]) if "fp32" in times else None
                for engine in args.engines:
                    why = run_failed.get(engine) or build_failed.get(engine)
                    if why:
                        record.print(f"{preset:7} {batch:5d} {engine:10} failed: {why}")
                        failed[f"{engine}_b{batch}{suffix}"] = why
                        result[f"{engine}_img_s_b{batch}{suffix}"] = None
                        continue
                    ts = times[engine]
                    ratio = f"{base / statistics.median(ts):8.2f}" if base else f"{'-':>8}"
                    record.print(f"{preset:7} {batch:5d} {engine:10} {batch / min(ts):11.1f} "
                                 f"{batch / statistics.median(ts):13.1f} {ratio}")
                result.update(summarize(batch, times, suffix, ort_comparable,
                                        auto.engine if auto is not None else None))
                if batch == max(args.batches):
                    last_times = times
            sizes = models.sizes
            ratio = sizes["exported_bytes"] / sizes["fp32_bytes"]
            result[f"size_ratio_fp32{suffix}"] = round(ratio, 4)
            result.update({f"{k}{suffix}": v for k, v in sizes.items()})
            onnx = ", ".join(f"{k.removesuffix('_bytes')} {v / 1e6:.3f} MB"
                             for k, v in sizes.items() if k.startswith("onnx_"))
            record.print(f"{preset}: exported b158 {sizes['exported_bytes'] / 1e6:.3f} MB, fp32 "
                         f"checkpoint {sizes['fp32_bytes'] / 1e6:.3f} MB, ratio {ratio:.4f}"
                         + (f"; {onnx}" if onnx else ""))
            if args.profile and last_times is not None:
                result.update(report_profiles(models, last_times, max(args.batches), preset,
                                              Path(tmp), ort_comparable, record))
    record.print(json.dumps(result))
    if args.out:
        record.write(args.out)
    return result


if __name__ == "__main__":
    main()
