"""The int engine's rescale, a slab of rows at a time against one pass: speed, same logits.

`bitvit.nn.quant.rescale` turns a layer's int32 products into fp32 a slab of rows at a time
(``RESCALE_SLAB`` elements), so that its (rows, out) ratio and torch's fp32 copy of the int32
products stay small instead of each as large as the layer's output. This times the int engine
(a b158 export, random weights, loaded with ``engine="int"``) with the slabs and with one pass
(the slab set past any layer's size), interleaved, at each preset and batch: median images/s and
slabs/one pass (above 1: the slabs are faster), after checking both give identical logits.
`benchmarks/inference_memory.py` measures what the slabs save in memory.

    PYTHONPATH=src python benchmarks/rescale_slabs.py [--presets paper,strong] [--threads 2]
        [--repeats 20] [--batches 1,32,256] [--no-malloc-tune] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Record,
    command_line,
    cpu_model,
    git_commit,
    kernel_info,
    parse_list,
    tune_malloc,
)
from inference import PRESETS  # noqa: E402

from bitvit import VisionTransformer, load, quantize_  # noqa: E402
from bitvit.data import DataConfig  # noqa: E402
from bitvit.deploy.export import export_model  # noqa: E402
from bitvit.nn import quant  # noqa: E402
from bitvit.nn.quant import QuantConfig  # noqa: E402
from bitvit.training.config import Config  # noqa: E402

ONE_PASS = 1 << 62  # a slab larger than any layer: rescale's single expression


def int_model(preset: str, tmp: Path) -> torch.nn.Module:
    """The preset's b158 export (random weights) loaded on the int engine."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    quantize_(model, "b158")
    data = DataConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    path = tmp / f"{preset}-b158.safetensors"
    export_model(model, Config(model=cfg, quant=QuantConfig(method="b158"), data=data),
                 [str(i) for i in range(cfg.num_classes)], path)
    return load(path, engine="int")


def seconds(model: torch.nn.Module, x: torch.Tensor, slab: int) -> float:
    quant.RESCALE_SLAB = slab
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paper,strong")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--no-malloc-tune", action="store_true",
                    help="leave glibc malloc at its defaults (see _common.tune_malloc)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else tune_malloc()
    slab = quant.RESCALE_SLAB
    rec = Record()
    isa = kernel_info()
    rec.print(f"# {command_line()}")
    rec.print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
              f"{cpu_model()} ({isa['isa']}, int kernel {isa['kernel']}), torch "
              f"{torch.__version__}, {args.threads} threads, malloc tuned {tuned}")
    rec.print(f"# b158 exports, random weights, int engine; slab {slab} elements; "
              f"{args.repeats} interleaved repeats; median images/s")
    rec.print(f"{'preset':>6} {'batch':>5} {'one pass img/s':>15} {'slabs img/s':>12} "
              f"{'slabs/one pass':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in parse_list(args.presets, tuple(PRESETS), "presets"):
            model = int_model(preset, Path(tmp))
            cfg = PRESETS[preset]
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size,
                                generator=torch.Generator().manual_seed(batch))
                quant.RESCALE_SLAB = ONE_PASS
                whole = model(x)
                quant.RESCALE_SLAB = slab
                if not torch.equal(whole, model(x)):
                    rec.print(f"{preset} batch {batch}: the slabs' logits differ from one pass'")
                    return 1
                times: dict[int, list[float]] = {ONE_PASS: [], slab: []}
                for _ in range(args.repeats):  # interleaved: drift hits both alike
                    for size in times:
                        times[size].append(seconds(model, x, size))
                ips = {k: batch / statistics.median(v) for k, v in times.items()}
                rec.print(f"{preset:>6} {batch:5d} {ips[ONE_PASS]:15.1f} {ips[slab]:12.1f} "
                          f"{ips[slab] / ips[ONE_PASS]:15.3f}")
    quant.RESCALE_SLAB = slab
    if args.out:
        rec.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
