"""Time one training step (forward + backward + Adam) of the paper-sized ViT, per method.

All methods run in the same process on the same inputs, interleaved round by round so that
drift in the machine's speed hits every method alike. Prints a table and, last, one JSON line.

    python benchmarks/train_step.py [--batch 128] [--repeats 10] [--methods fp,b158,...]
        [--compile]

``--compile`` adds each method under ``torch.compile`` as ``<method>-c`` (what ``bitvit train``
does with ``train.compile=true``), timed in the same rounds; its compile time is left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bitvit import VisionTransformer, ViTConfig, quantize_
from bitvit.nn.kernels import choose_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default="fp,b158,bitnet,sign,xnor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true",
                    help="also time every method under torch.compile, as <method>-c")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ViTConfig(patch_size=16, dim=256, depth=6, heads=8, mlp_ratio=4.0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    setups = {}
    for method in args.methods.split(","):
        model = VisionTransformer(cfg).to(args.device)
        quantize_(model, method)
        setups[method] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
        if args.compile:
            twin = copy.deepcopy(model)  # same weights; draws nothing from the RNG
            setups[f"{method}-c"] = (torch.compile(twin),
                                     torch.optim.Adam(twin.parameters(), lr=1e-3))

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if args.device != "cpu":
            torch.cuda.synchronize()

    for model, opt in setups.values():
        for _ in range(args.warmup):
            step(model, opt)
    times: dict[str, list[float]] = {m: [] for m in setups}
    for _ in range(args.repeats):
        for method, (model, opt) in setups.items():
            t0 = time.perf_counter()
            step(model, opt)
            times[method].append(time.perf_counter() - t0)

    base = statistics.median(times["fp"]) if "fp" in times else None
    kernel = choose_kernel(args.device)  # decided by the quantized models' first step
    print(f"train step, paper ViT (patch 16, dim 256, depth 6), batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"integer kernel: {kernel.name} ({kernel.reason})")
    print(f"{'method':10} {'min ms':>9} {'median ms':>10} {'median/fp':>10}")
    result = {"batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "isa": kernel.isa, "int_kernel": kernel.name}
    for method, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base if base else float("nan")
        print(f"{method:10} {min(ts) * 1e3:9.1f} {med * 1e3:10.1f} {ratio:10.3f}")
        result[f"{method}_median_ms"] = round(med * 1e3, 2)
        result[f"ratio_{method}_fp"] = round(ratio, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
