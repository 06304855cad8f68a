"""Inference memory, measured: what each engine adds to a process's resident memory.

The first study leaves "the real inference memory" open; `bitvit profile` estimates bytes from
the architecture, and this measures them. For each preset and engine, a fresh child process
imports the same libraries (torch, bitvit, onnxruntime), makes its input batch, then reads its
resident set (VmRSS, after freed memory is returned with glibc's ``malloc_trim``) as the
baseline, loads the model and reads it again the same way (``load``: weights and whatever the
engine keeps), then resets the peak (``/proc/self/clear_refs``), runs the batch 3 times and
reads the peak (VmHWM; ``peak``: load plus the inference's working memory). Engines:

- ``fp32``: the unquantized ViT, torch eager, from an fp32 safetensors state dict (the baseline
  of every ratio);
- ``int`` / ``fp``: the b158 export loaded with `bitvit.load(engine="int" | "fp")`;
- ``ort-token``: bitvit's exact per-token ONNX graph of the b158 model under ONNX Runtime;
- ``ort-fp32``: the unquantized model's fp32 ONNX graph under ONNX Runtime.

Weights are random (memory does not depend on training), the same for every engine. A process's
memory is taken not to depend on what else the machine runs (unlike its speed), so it was
measured beside other work; the thread count does change working memory (per-thread buffers), so
it is part of the record.

    PYTHONPATH=src python benchmarks/inference_memory.py [--presets paper,strong]
        [--batches 1,256] [--threads 2] [--out benchmarks/results/inference-memory.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Record, command_line, cpu_model, git_commit, kernel_info  # noqa: E402
from inference import PRESETS  # noqa: E402

ENGINES = ("fp32", "int", "fp", "ort-token", "ort-fp32")
FILES = {"fp32": "fp32.safetensors", "int": "b158.safetensors", "fp": "b158.safetensors",
         "ort-token": "b158-token.onnx", "ort-fp32": "fp32.onnx"}
MIB = 1 << 20


def _settled_rss() -> int:
    """VmRSS once freed memory is given back (gc, then glibc's malloc_trim): otherwise an
    allocation reuses pages freed earlier, and the growth of the resident set misses it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status("VmRSS")


def _status(key: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def write_files(preset: str, folder: Path) -> None:
    """The models every child loads: fp32 weights, the b158 export, both ONNX graphs."""
    from safetensors.torch import save_file

    from bitvit import VisionTransformer, quantize_
    from bitvit.data import DataConfig
    from bitvit.deploy.export import export_model
    from bitvit.deploy.onnx_export import to_onnx
    from bitvit.nn.quant import QuantConfig
    from bitvit.training.config import Config

    cfg = replace(PRESETS[preset], pooling="cls")
    torch.manual_seed(0)
    fp32 = VisionTransformer(cfg).eval()
    save_file({k: v.contiguous() for k, v in fp32.state_dict().items()},
              folder / FILES["fp32"])
    to_onnx(fp32, folder / FILES["ort-fp32"])
    b158 = VisionTransformer(cfg).eval()
    b158.load_state_dict(fp32.state_dict())
    quantize_(b158, "b158")
    data = DataConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    config = Config(model=cfg, quant=QuantConfig(method="b158"), data=data)
    export_model(b158, config, [str(i) for i in range(cfg.num_classes)],
                 folder / FILES["int"])
    to_onnx(b158.eval(), folder / FILES["ort-token"], act_quant="token")


def child(engine: str, preset: str, folder: Path, batch: int, threads: int) -> dict[str, int]:
    """One engine in this (fresh) process: baseline, after load, and peak resident bytes."""
    import onnxruntime  # noqa: F401 - every engine's process holds the same libraries
    from safetensors.torch import load_file

    from bitvit import VisionTransformer, load
    from bitvit.deploy.onnx_runtime import OrtModel
    from bitvit.nn.kernels import choose_kernel

    torch.set_num_threads(threads)
    choose_kernel("cpu")  # the int kernel's one-time choice (cached on disk), before the baseline
    cfg = replace(PRESETS[preset], pooling="cls")
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    baseline = _settled_rss()
    path = folder / FILES[engine]
    if engine == "fp32":  # built without weights, then given the file's: one copy, as bitvit's
        with torch.device("meta"):
            model = VisionTransformer(cfg).eval()
        model.load_state_dict(load_file(str(path)), assign=True)
    elif engine in ("int", "fp"):
        model = load(path, engine=engine)
    else:
        model = OrtModel(path, threads=threads)
    tensors = -1  # ONNX Runtime's own copy: not counted here
    if not isinstance(model, OrtModel):  # read every weight once: a file-backed (mmapped)
        held = [*model.parameters(), *model.buffers()]  # tensor is resident only when read
        for t in held:
            t.float().sum()
        tensors = sum(t.numel() * t.element_size() for t in held)
    loaded = _settled_rss()  # what the model holds, its loading's temporaries freed
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    return {"baseline": baseline, "tensors": tensors, "load": loaded - baseline,
            "peak": max(_status("VmHWM"), loaded) - baseline}


def measure(engine: str, preset: str, folder: Path, batch: int, threads: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--child", engine, "--presets", preset,
                          "--dir", str(folder), "--batches", str(batch), "--threads",
                          str(threads)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{engine}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(preset: str, batches: list[int], threads: int, rec: Record) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_files(preset, folder)
        rows = {e: {b: measure(e, preset, folder, b, threads) for b in batches} for e in ENGINES}
        sizes = {e: (folder / FILES[e]).stat().st_size for e in ENGINES}
    base = rows["fp32"]
    rec.print(f"\n## {preset} preset ({PRESETS[preset].dim} dim, depth {PRESETS[preset].depth}, "
              f"patch {PRESETS[preset].patch_size}); MiB over the process's baseline; ratio: "
              "over fp32's")
    head = " ".join(f"{'peak b' + str(b):>10} {'ratio':>6}" for b in batches)
    rec.print(f"{'engine':10} {'file MiB':>9} {'tensors':>8} {'load MiB':>9} {'ratio':>6} {head}")
    for engine, by_batch in rows.items():
        first = by_batch[batches[0]]
        load_ratio = first["load"] / max(base[batches[0]]["load"], 1)
        cells = " ".join(f"{by_batch[b]['peak'] / MIB:10.1f} "
                         f"{by_batch[b]['peak'] / max(base[b]['peak'], 1):6.2f}" for b in batches)
        tensors = f"{first['tensors'] / MIB:8.2f}" if first["tensors"] >= 0 else f"{'n/a':>8}"
        rec.print(f"{engine:10} {sizes[engine] / MIB:9.2f} {tensors} {first['load'] / MIB:9.1f} "
                  f"{load_ratio:6.2f} {cells}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paper,strong")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    presets, batches = args.presets.split(","), [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, presets[0], args.dir, batches[0], args.threads)))
        return 0
    rec = Record()
    isa = kernel_info()
    rec.print(f"# {command_line()}")
    rec.print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
              f"{cpu_model()} ({isa.get('hardware_isa', isa['isa'])}), torch {torch.__version__}, "
              f"{args.threads} threads; resident memory (VmRSS, VmHWM), one process per cell")
    for preset in presets:
        report(preset, batches, args.threads, rec)
    if args.out:
        rec.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
