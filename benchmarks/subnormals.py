"""Time training steps of a trained full-precision model with and without flushing subnormals.

Late in training, full precision's gradients underflow to subnormal floats, which x86 CPUs
handle in microcode; `bitvit train` flushes them to zero (`bitvit.training.loop.flush_subnormals`).
This measures what that buys: forward + backward + Adam on real training images, for the model
of a run folder (``--run``, trained) and a freshly initialised model of the same config (the
control, which has no subnormals to flush), each in a child process per mode so that every
thread of the pool starts in that mode. Rounds alternate the modes; medians over all steps.

    python benchmarks/subnormals.py --run RUN_DIR [--threads 1] [--rounds 3] [--steps 5]
        [--out benchmarks/results/subnormals.txt]

The run folder's data is read as its config says (``BITVIT_DATA`` where its path is unset).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Record, command_line, cpu_model, git_commit, kernel_info  # noqa: E402

TINY = torch.finfo(torch.float32).tiny


def _count_subnormal_grads(model: torch.nn.Module) -> tuple[list[int], list]:
    """Hooks that count subnormal values in the gradients flowing out of each leaf module."""
    counts = [0, 0]

    def hook(module, grad_input, grad_output):
        for g in grad_output:
            if g is not None:
                counts[0] += int(((g != 0) & (g.abs() < TINY)).sum())
                counts[1] += g.numel()

    handles = [m.register_full_backward_hook(hook) for m in model.modules()
               if not list(m.children())]
    return counts, handles


def child(run: str, flush: bool, steps: int, batch: int) -> dict[str, object]:
    """One mode in a fresh process: the mode set before torch starts any thread."""
    torch.set_flush_denormal(flush)
    from bitvit.data import load_data, normalize
    from bitvit.training.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(run)
    data = load_data(ckpt.config.data, ckpt.config.model.image_size, ckpt.config.model.in_channels)
    x = normalize(data.train.images[: batch * steps], data.mean, data.std)
    y = data.train.labels[: batch * steps]
    torch.manual_seed(0)
    out: dict[str, object] = {"flush": flush}
    for name, model in (("trained", ckpt.model), ("fresh", build_model(ckpt.config))):
        model = copy.deepcopy(model).train()
        opt = torch.optim.Adam(model.parameters(), lr=ckpt.config.train.lr)
        times = []
        for i in range(steps + 1):  # the first step warms up, untimed
            xb, yb = x[(i % steps) * batch:][:batch], y[(i % steps) * batch:][:batch]
            counts, hooks = _count_subnormal_grads(model) if i == 0 else ([], [])
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            for h in hooks:
                h.remove()
            if counts:
                out[f"{name}_subnormal_grad_share"] = counts[0] / max(counts[1], 1)
            if i:
                times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = [round(t * 1e3, 2) for t in times]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained full-precision run folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.run, args.child == "on", args.steps, args.batch)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    times: dict[str, list[float]] = {}
    shares: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--run", args.run,
                                   "--steps", str(args.steps), "--batch", str(args.batch)],
                                  env=env, capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for model in ("trained", "fresh"):
                times.setdefault(f"{model}, flush {mode}", []).extend(result[f"{model}_ms"])
                shares[f"{model}, flush {mode}"] = result[f"{model}_subnormal_grad_share"]
    rec = Record()
    info = kernel_info()
    rec.print(f"# {command_line()}")
    rec.print(f"# commit {git_commit()}; {cpu_model()}; ISA {info['isa']}; torch "
              f"{torch.__version__}; {args.threads} thread(s); batch {args.batch}; "
              f"{args.rounds} rounds x {args.steps} steps per mode, each mode in its own process")
    med = {k: statistics.median(v) for k, v in times.items()}
    rec.print(f"{'model, mode':22} {'median ms':>10} {'subnormal share, activation grads':>36}")
    for k, v in med.items():
        rec.print(f"{k:22} {v:10.1f} {shares[k]:36.2e}")
    ratios = {"trained_off_over_on": med["trained, flush off"] / med["trained, flush on"],
              "fresh_off_over_on": med["fresh, flush off"] / med["fresh, flush on"],
              "trained_over_fresh_off": med["trained, flush off"] / med["fresh, flush off"],
              "trained_over_fresh_on": med["trained, flush on"] / med["fresh, flush on"]}
    rec.print(json.dumps({"run": args.run, "threads": args.threads, "isa": info["isa"],
                          **{k: round(v, 3) for k, v in ratios.items()}}))
    if args.out:
        rec.write(args.out)


if __name__ == "__main__":
    main()
