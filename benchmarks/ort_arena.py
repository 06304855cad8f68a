"""What capping ONNX Runtime's memory costs: one bitvit graph, two sessions, interleaved.

bitvit's sessions share a CPU arena registered once per process and capped at 80% of the memory
available when the first session starts (`bitvit.deploy.onnx_runtime.arena_cap`,
``session.use_env_allocators``). This opens the same exported graph (the paper preset, random
weights, as `benchmarks/onnx_ab.py` exports it) as bitvit opens it (capped) and with the same
options but the session's own arena (ONNX Runtime's default, no cap), and times session.run
uncapped, capped, uncapped, ... at each batch: median images/s and capped/uncapped (below 1:
the cap costs speed).

    PYTHONPATH=src python benchmarks/ort_arena.py [--act-quant token] [--threads 2]
        [--repeats 30] [--batches 1,32,256] [--out benchmarks/results/ort-arena.txt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Record, command_line, cpu_model, git_commit, kernel_info  # noqa: E402
from onnx_ab import PAPER, timed  # noqa: E402

from bitvit import VisionTransformer, quantize_  # noqa: E402
from bitvit.deploy.onnx_export import to_onnx  # noqa: E402
from bitvit.deploy.onnx_runtime import ORT_SILENT, OrtModel, arena_cap  # noqa: E402
from bitvit.system import human_bytes  # noqa: E402


def uncapped(path: Path, threads: int) -> ort.InferenceSession:
    """The session options `bitvit.deploy.onnx_runtime` sets, less the shared capped arena."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = ORT_SILENT
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--act-quant", choices=("token", "tensor"), default="token")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = VisionTransformer(replace(PAPER, pooling="cls")).eval()
    quantize_(model, "b158")
    path = to_onnx(model.eval(), Path(tempfile.mkdtemp()) / "paper-b158.onnx",
                   act_quant=args.act_quant)
    capped = OrtModel(path, threads=args.threads).session
    plain = uncapped(path, args.threads)
    rec = Record()
    isa = kernel_info()
    rec.print(f"# {command_line()}")
    rec.print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
              f"{cpu_model()} ({isa.get('hardware_isa', isa['isa'])}), onnxruntime "
              f"{ort.__version__}, {args.threads} threads")
    rec.print(f"# paper preset b158, act_quant {args.act_quant}, random weights; cap "
              f"{human_bytes(arena_cap() or 0)}; {args.repeats} interleaved repeats")
    rec.print(f"{'batch':>5} {'uncapped img/s':>15} {'capped img/s':>13} {'capped/uncapped':>16}")
    for batch in (int(b) for b in args.batches.split(",")):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        (a,), (b,) = plain.run(["logits"], {"images": x}), capped.run(["logits"], {"images": x})
        if not np.array_equal(a, b):
            rec.print(f"batch {batch}: the two sessions' logits differ")
            return 1
        times: dict[str, list[float]] = {"plain": [], "capped": []}
        for _ in range(args.repeats):  # interleaved: drift on the machine hits both alike
            times["plain"].append(timed(plain, x))
            times["capped"].append(timed(capped, x))
        ips = {k: batch / statistics.median(v) for k, v in times.items()}
        rec.print(f"{batch:5d} {ips['plain']:15.1f} {ips['capped']:13.1f} "
                  f"{ips['capped'] / ips['plain']:16.3f}")
    if args.out:
        rec.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
