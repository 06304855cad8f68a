"""A/B two bitvit ONNX graphs under ONNX Runtime, interleaved in one process.

For changes to the ONNX export's graph: export the same random-weight model with the old and the
new code (``export``, run from each checkout; the same ``--seed`` gives the same weights), then
time both (``time``). It opens them with `bitvit.deploy.onnx_runtime.OrtModel`'s session options
(``--threads`` intra-op threads), checks that their logits agree on random inputs (exit 1 if
not), and times session.run A, B, A, B, ... at each batch, printing median images/s and B/A
(above 1: B is faster).

    PYTHONPATH=src python benchmarks/onnx_ab.py export OUT.onnx [--act-quant token|tensor]
        [--method b158|fp] [--pooling cls|mean] [--seed 0]
    PYTHONPATH=src python benchmarks/onnx_ab.py time A.onnx B.onnx [--repeats 20] [--threads 2]
        [--batches 1,256] [--warmup 3] [--rtol 1e-2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from inference import PRESETS  # beside this script: the benchmark's model presets

from bitvit import VisionTransformer, quantize_
from bitvit.deploy.onnx_export import to_onnx
from bitvit.deploy.onnx_runtime import OrtModel

PAPER = PRESETS["paper"]  # built as benchmarks/inference.py builds it (random weights)


def export(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = VisionTransformer(replace(PAPER, pooling=args.pooling)).eval()
    if args.method != "fp":
        quantize_(model, args.method)
    path = to_onnx(model.eval(), args.out, act_quant=args.act_quant)
    print(f"wrote {path} ({args.method}, act_quant {args.act_quant}, seed {args.seed})")
    return 0


def timed(session: Any, x: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(["logits"], {"images": x})
    return time.perf_counter() - start


def agree(a: Any, b: Any, shape: tuple[int, ...], rtol: float) -> bool:
    """Logits of A and B on random normalized images: max |A - B| within rtol * max |A|."""
    x = np.random.default_rng(0).standard_normal((64, *shape), dtype=np.float32)
    (la,), (lb,) = (s.run(["logits"], {"images": x}) for s in (a, b))
    diff, scale = float(np.abs(la - lb).max()), float(np.abs(la).max())
    same_top = float((la.argmax(1) == lb.argmax(1)).mean())
    ok = la.shape == lb.shape and diff <= rtol * scale
    print(f"agreement on 64 random images: max |A - B| {diff:.3g} (max |A| {scale:.3g}, "
          f"rtol {rtol}), argmax agreement {same_top:.3f}: {'ok' if ok else 'DISAGREE'}")
    return ok


def time_ab(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.threads < 1:
        print("onnx_ab: --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"onnx_ab: --batches {args.batches!r}: expected integers like 1,256",
              file=sys.stderr)
        return 2
    models = [OrtModel(p, threads=args.threads) for p in (args.a, args.b)]
    a, b = (m.session for m in models)
    shape = tuple(a.get_inputs()[0].shape[1:])
    print(f"A = {args.a} (act_quant {models[0].act_quant})\nB = {args.b} "
          f"(act_quant {models[1].act_quant})\nthreads {args.threads}, repeats {args.repeats}, "
          f"warmup {args.warmup}, input (N, {', '.join(map(str, shape))})")
    if not agree(a, b, shape, args.rtol):
        return 1
    print(f"{'batch':>5} {'A img/s':>10} {'B img/s':>10} {'B/A':>6}")
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        for _ in range(args.warmup):
            timed(a, x), timed(b, x)
        times: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.repeats):  # interleaved: drift on the machine hits both alike
            times["A"].append(timed(a, x))
            times["B"].append(timed(b, x))
        ips = {k: batch / statistics.median(v) for k, v in times.items()}
        print(f"{batch:5d} {ips['A']:10.1f} {ips['B']:10.1f} {ips['B'] / ips['A']:6.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="export a random-weight paper-preset model")
    ex.add_argument("out")
    ex.add_argument("--act-quant", choices=("token", "tensor"), default="token")
    ex.add_argument("--method", default="b158", help="a quantization method, or fp")
    ex.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    ex.add_argument("--seed", type=int, default=0)
    tm = sub.add_parser("time", help="check that two graphs agree, then time them interleaved")
    tm.add_argument("a", type=Path)
    tm.add_argument("b", type=Path)
    tm.add_argument("--repeats", type=int, default=20)
    tm.add_argument("--threads", type=int, default=2)
    tm.add_argument("--batches", default="1,256")
    tm.add_argument("--warmup", type=int, default=3)
    tm.add_argument("--rtol", type=float, default=1e-2,
                    help="agreement bar, relative to A's largest logit")
    args = ap.parse_args()
    return export(args) if args.command == "export" else time_ab(args)


if __name__ == "__main__":
    sys.exit(main())
