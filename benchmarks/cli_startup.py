"""Start-up time of the command line against ``import torch``, measured in one run.

Times, in fresh subprocesses, ``python -c "import torch"``, ``python -m bitvit --version`` and
``python -m bitvit train --help`` (min over repetitions), and prints them with the ratios as JSON.
The bar (issue 14): each command in at most a third of torch's import time.

    PYTHONPATH=src python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "bitvit --version": [sys.executable, "-m", "bitvit", "--version"],
    "bitvit train --help": [sys.executable, "-m", "bitvit", "train", "--help"],
}


def best_seconds(command: list[str], repeats: int) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # Interleaved rounds, so that a slow spell on a shared machine hits every command alike.
    times = {name: float("inf") for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name] = min(times[name], best_seconds(command, 1))
    torch_s = times["import torch"]
    print(json.dumps({
        "seconds": {k: round(v, 4) for k, v in times.items()},
        "ratio_to_import_torch": {k: round(v / torch_s, 3) for k, v in times.items()
                                  if k != "import torch"},
        "bar": 1 / 3,
        "within_bar": all(v <= torch_s / 3 for k, v in times.items() if k != "import torch"),
    }, indent=2))


if __name__ == "__main__":
    main()
