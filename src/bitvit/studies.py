"""Studies: sweeps of training runs, their comparison with honest statistics, and the report.

Sweep files
-----------
A sweep file is YAML with these keys (paths are relative to the working directory: run sweeps
from the repository root, as the recorded commands do)::

    title: "Study 1 (CPU tier): BitLinear on the paper's ViT"   # for the report
    question: "Does BitLinear lower the test loss? ..."           # for the report
    base: configs/paper.yaml          # the config every run starts from
    overrides: [train.epochs=15]      # section.key=value, applied to every run
    full_epochs: 100                  # optional: the budget this tier shortens (report says so)
    out: results/study1-cpu           # one run folder per point goes here
    runs:                             # optional: a list of sub-grids; their union ...
      - {quant.method: [sign, xnor], quant.where: [all, mlp, attn], quant.act_bits: [none, 1]}
      - {quant.method: [fp, b158]}
    grid:                             # ... is crossed with this grid (cartesian product)
      train.seed: [0, 1, 2]

Without ``runs`` the points are the grid's cartesian product. A value may be a scalar (one
choice) or a list. Each point is one run folder under ``out``, named from its values in the
order of the file (``runs`` keys, then ``grid`` keys), e.g. ``method=b158_seed=0`` or
``method=sign_where=mlp_act_bits=1_seed=2`` (the last part of the key, or the whole key when two
keys share a last part; characters outside ``[A-Za-z0-9.+-]`` become ``-``). Runs are trained
grid-major: every ``runs`` point at the first grid point (seed 0) before any at the second.

``run_sweep`` skips finished runs (run.json says finished and every epoch is in metrics.csv)
and runs whose ``bitvit train`` is alive (it holds the run folder's lock), resumes runs that
have a checkpoint, and restarts the others from scratch, moving what they hold aside to
``NAME.restart-TIME/`` (a sweep deletes nothing), so a sweep can be stopped and started again
at will. Extra
overrides given to the sweep apply to new runs; a resumed run keeps its own config.yaml except
``train.epochs`` and ``data.path`` (what ``bitvit train --resume`` can change), and an extra
override it could not honour is refused. Weights stay in the run folders (``last/``, ``best/``)
for export and evaluation; ``.gitignore`` keeps them out of ``results/``.

Comparison
----------
`load_runs` reads run folders (metrics.csv, config.yaml, run.json); `group_runs` groups runs
whose configs are equal except for the seed and settings that do not change the experiment
(device, data location, compile, eval batch size); `compare_groups` computes per-group
mean +- std over seeds (test accuracy and loss over the last k epochs and at the final one,
train accuracy and the train-test gap from the eval-mode ``train_eval_acc`` where runs have it)
and, for each quantized group, the difference to its full-precision group: a 95% confidence
interval (Welch-Satterthwaite), Welch's t-test p-value, Holm-adjusted over the table, and a TOST
equivalence test at a stated margin beside the margin the seeds can resolve (`bitvit.stats`).
`compare_markdown` and `plot_groups` turn that into a table and the first study's figure;
`write_report` regenerates ``results/README.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bitvit import rundir
from bitvit.config import Config, load_config, read_yaml_mapping
from bitvit.quant import FULL_PRECISION, resolve_act_bits
from bitvit.stats import (  # noqa: F401 - Summary, summarize, welch_difference: also from here
    Difference,
    Summary,
    adjust_holm,
    last_k_mean,
    summarize,
    welch_difference,
)

SWEEP_KEYS = {"title", "question", "base", "overrides", "full_epochs", "out", "runs", "grid"}
SWEEP_COPY = "sweep.yaml"
COMMANDS_FILE = "commands.txt"


class SweepError(ValueError):
    """A bad sweep file or a run folder that conflicts with it; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Sweep files and run folder names
# ---------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    path: Path
    base: str
    out: Path
    overrides: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # one {section.key: value} per run
    keys: list[str] = field(default_factory=list)  # the point keys, in order of first appearance
    title: str = ""
    question: str = ""
    full_epochs: int | None = None

    def name(self, point: dict[str, Any]) -> str:
        return run_name(point, self.keys)

    def run_dirs(self) -> dict[str, dict[str, Any]]:
        """Run folder name -> point, in sweep order."""
        return {self.name(p): p for p in self.points}


def _expand(grid: Any, where: str) -> list[dict[str, Any]]:
    """The cartesian product of a {section.key: value or [values]} mapping."""
    if grid is None:
        return [{}]
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: expected a mapping of section.key to a list of values")
    for key in grid:
        if not isinstance(key, str) or key.count(".") != 1:
            raise SweepError(f"{where}: key {key!r}: expected section.key (e.g. quant.method)")
    choices = [v if isinstance(v, list) else [v] for v in grid.values()]
    for key, values in zip(grid, choices, strict=True):
        if not values:
            raise SweepError(f"{where}: {key} has an empty list of values")
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*choices)]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (see the module docstring for its schema)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", "keys base, out, grid (and runs)", SweepError)
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; valid keys: "
                         f"{', '.join(sorted(SWEEP_KEYS))}")
    for key in ("base", "out"):
        if not isinstance(raw.get(key), str):
            raise SweepError(f"{path}: {key!r} must be a path (relative to the working directory)")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: 'overrides' must be a list of section.key=value strings")
    runs = raw.get("runs")
    if runs is not None and (not isinstance(runs, list) or not runs):
        raise SweepError(f"{path}: 'runs' must be a non-empty list of mappings")
    grid = _expand(raw.get("grid"), f"{path}: grid")
    arms = [{}] if runs is None else [
        p for i, sub in enumerate(runs) for p in _expand(sub, f"{path}: runs[{i}]")]
    # The grid is the outer loop (every arm gets seed 0 before any gets seed 1), so a sweep
    # stopped early leaves every configuration with some seeds rather than some with none.
    points = [{**arm, **g} for g in grid for arm in arms]
    # Names list the runs' own keys first, then the grid's (e.g. method=sign_where=mlp_seed=0).
    keys = list(dict.fromkeys([*(k for arm in arms for k in arm), *(raw.get("grid") or {})]))
    if not keys:
        raise SweepError(f"{path}: no grid: give 'grid' and/or 'runs' with at least one key")
    full_epochs = raw.get("full_epochs")
    if full_epochs is not None and (not isinstance(full_epochs, int) or full_epochs < 1):
        raise SweepError(f"{path}: 'full_epochs' must be a positive integer")
    sweep = Sweep(path=path, base=raw["base"], out=Path(raw["out"]), overrides=list(overrides),
                  points=points, keys=keys, title=str(raw.get("title") or path.stem),
                  question=str(raw.get("question") or ""), full_epochs=full_epochs)
    names = [sweep.name(p) for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepError(f"{path}: the grid gives run {duplicates[0]} more than once")
    return sweep


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-"))
            for k, s in zip(keys, last, strict=True)}


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "-".join(_format_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def run_name(point: dict[str, Any], keys: list[str] | None = None) -> str:
    """A short, filesystem-safe, stable folder name from a point's values, e.g. method=b158_seed=0.

    ``keys`` (all keys of the sweep, in order) fixes the order and the short names; keys absent
    from this point are left out of its name.
    """
    keys = keys or list(point)
    short = _short_keys(keys)
    return "_".join(f"{short[k]}={_format_value(point[k])}" for k in keys if k in point)


def point_overrides(point: dict[str, Any]) -> list[str]:
    """The point as section.key=value overrides (JSON values, which YAML parses back exactly)."""
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


def sweep_config(sweep: Sweep, point: dict[str, Any], extra: list[str] | None = None) -> Config:
    return load_config(sweep.base, [*sweep.overrides, *(extra or []), *point_overrides(point)])


# ---------------------------------------------------------------------------------------------
# Run folders: what state they are in
# ---------------------------------------------------------------------------------------------

# Settings that do not change what a run measures: left out when grouping runs and when checking
# a run folder against its sweep.
IGNORED_KEYS = {
    "train.seed", "train.device", "train.compile", "train.eval_batch_size",
    "data.path", "data.download", "data.download_url", "data.download_md5", "data.cache_dir",
}


def experiment_key(config_dict: dict[str, dict[str, Any]], ignore: set[str] = IGNORED_KEYS
                   ) -> dict[str, Any]:
    """A flat {section.key: value} of what a run measures; quantization settings normalized.

    ``act_bits: default`` becomes the bits it means; full precision (``method: fp`` or
    ``where: none``) drops every other quant key, since none of them does anything then.
    """
    flat = {f"{s}.{k}": (list(v) if isinstance(v, tuple) else v)
            for s, section in config_dict.items() for k, v in (section or {}).items()}
    method = flat.get("quant.method", FULL_PRECISION)
    if method == FULL_PRECISION or flat.get("quant.where") == "none":
        for k in [k for k in flat if k.startswith("quant.")]:
            del flat[k]
        flat["quant.method"] = FULL_PRECISION
    elif "quant.act_bits" in flat:
        flat["quant.act_bits"] = resolve_act_bits(method, flat["quant.act_bits"])
    return {k: v for k, v in sorted(flat.items()) if k not in ignore}


def same_setting(key: str, saved: Any, wanted: Any) -> bool:
    """Whether a run folder's experiment_key value matches the one a sweep asks for.

    A run records the numbers ``data.mean``/``data.std: auto`` resolved to, and auto resolves
    the same way for the same data, so auto on either side matches any numbers.
    """
    auto = key in ("data.mean", "data.std") and "auto" in (saved, wanted)
    return auto or saved == wanted


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _count_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    return max(len(path.read_text().strip().splitlines()) - 1, 0)


def run_state(run_dir: Path, config: Config) -> str:
    """What a sweep does with a run folder: new, finished (skip), running (skip: another process
    holds the folder's lock, or run.json says running and its process is alive; see
    `_still_running`), resume (a checkpoint `bitvit train --resume` can continue, and
    config.yaml) or restart (what the folder holds is moved aside first, never deleted).

    Raises `SweepError` when the folder holds a run of a different experiment (the sweep file
    changed under it); more epochs than the folder's run is fine: it is resumed to extend it.
    """
    run_dir = Path(run_dir)
    if rundir.locked_by_other(run_dir):
        return "running"  # a `bitvit train` at work right now: leave it alone
    if rundir.is_empty(run_dir):
        return "new"
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = experiment_key(yaml.safe_load(saved_path.read_text()) or {},
                               IGNORED_KEYS | {"train.epochs"})
        wanted = experiment_key(config.to_dict(), IGNORED_KEYS | {"train.epochs"})
        differing = [k for k in sorted(set(saved) | set(wanted))
                     if not same_setting(k, saved.get(k), wanted.get(k))]
        if differing:
            k = differing[0]
            raise SweepError(f"{run_dir}: holds a run with {k}={saved.get(k)!r} but the sweep "
                             f"asks {k}={wanted.get(k)!r}; move the folder away or change 'out'")
    rows = _count_rows(run_dir / "metrics.csv")
    epochs = config.train.epochs
    if rows > epochs:
        raise SweepError(f"{run_dir}: holds {rows} epochs but the sweep asks train.epochs="
                         f"{epochs}; move the folder away or change 'out'")
    info = rundir.read_info(run_dir)
    status = info.get("status")
    if status == "finished" and rows == epochs:
        return "finished"
    # Runs written without the lock (older bitvit, or a file system without flock).
    if status == "running" and _still_running(run_dir, info):
        return "running"
    if rundir.has_checkpoint(run_dir) and saved_path.is_file():
        return "resume"
    return "restart"


def _still_running(run_dir: Path, info: dict[str, Any]) -> bool:
    """Whether the `bitvit train` that wrote a "running" run.json is alive.

    On the host that wrote it (run.json ``host``), its ``pid`` says so: a process killed by
    SIGKILL, the OOM killer or a preemption never marks its run interrupted, and its run is
    resumed at once. Elsewhere, or for run.json files without those keys, the folder's age is
    the best guess.
    """
    pid, host = info.get("pid"), info.get("host")
    if isinstance(pid, int) and pid > 0 and host == socket.gethostname():
        return _pid_alive(pid) and not _pid_started_after(pid, info.get("start"))
    return _recently_active(run_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _pid_started_after(pid: int, start: Any, slack: float = 5.0) -> bool:
    """Whether process ``pid`` started after the run's recorded start (ISO time): then the pid
    was reused by another process after the trainer died. False when unknown (no /proc)."""
    try:
        started = datetime.fromisoformat(str(start)).timestamp()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    # Field 22 of /proc/PID/stat (index 19 after the command name): start, in ticks after boot.
    process_start = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    return process_start > started + slack  # slack: start is recorded in whole seconds


def _recently_active(run_dir: Path, min_seconds: float = 1800.0) -> bool:
    """Whether a run folder changed within max(min_seconds, 3 x its longest epoch)."""
    try:
        longest = max((r.get("seconds", 0.0) for r in rundir.read_metrics(run_dir)),
                      default=0.0)
    except (ValueError, KeyError):
        longest = 0.0
    newest = max(f.stat().st_mtime for f in run_dir.iterdir())
    return time.time() - newest < max(min_seconds, 3 * longest)


# ---------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    name: str
    run_dir: Path
    point: dict[str, Any]
    config: Config
    state: str  # new | finished | running | resume | restart
    command: list[str]  # the equivalent `bitvit train` command


def plan_sweep(sweep: Sweep, extra: list[str] | None = None) -> list[PlannedRun]:
    """Every run of the sweep with its state and the `bitvit train` command that does it."""
    plan = []
    for name, point in sweep.run_dirs().items():
        config = sweep_config(sweep, point, extra)
        run_dir = sweep.out / name
        state = run_state(run_dir, config)
        command = train_command(sweep, point, run_dir, config, state, extra)
        plan.append(PlannedRun(name, run_dir, point, config, state, command))
    return plan


# What `bitvit train --resume DIR` cannot change (it takes only --data and --epochs): a sweep
# asking a resumed run for another value of one of these is refused rather than ignored.
RESUME_KEEPS = sorted(IGNORED_KEYS - {"data.path"})


def train_command(sweep: Sweep, point: dict[str, Any], run_dir: Path, config: Config,
                  state: str, extra: list[str] | None = None) -> list[str]:
    """The `bitvit train` command that trains a run folder in ``state``; the one-at-a-time path
    records it and the parallel path runs it, so both do the same.

    A new run gets every override (the sweep's, ``extra``, the point's). A resumed run keeps its
    own config.yaml: ``--epochs`` and, when the sweep moves the data, ``--data`` carry what a
    resume can change; any other setting that differs from the run's own raises `SweepError`.
    """
    if state != "resume":
        return ["bitvit", "train", "--config", sweep.base, "--out", str(run_dir), "--quiet",
                *sweep.overrides, *(extra or []), *point_overrides(point)]
    saved = experiment_key(load_config(run_dir / "config.yaml").to_dict(), set())
    wanted = experiment_key(config.to_dict(), set())
    for key in RESUME_KEEPS:
        if saved.get(key) != wanted.get(key):
            raise SweepError(f"{run_dir}: a resumed run keeps its own {key}={saved.get(key)!r} "
                             f"(bitvit train --resume changes only data.path and train.epochs) "
                             f"but the sweep asks {key}={wanted.get(key)!r}; drop that override, "
                             "or move the folder away to train the run again")
    command = ["bitvit", "train", "--resume", str(run_dir), "--epochs",
               str(config.train.epochs), "--quiet"]
    if wanted.get("data.path") != saved.get("data.path"):
        command += ["--data", str(config.data.path)]
    return command


def _record_sweep(sweep: Sweep, argv: list[str] | None) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    copy = sweep.out / SWEEP_COPY
    text = f"# copied from {sweep.path} by bitvit sweep\n" + sweep.path.read_text()
    if not copy.exists() or copy.read_text() != text:
        rundir.write_text(copy, text)
    if argv:
        line = shlex.join(argv)
        log = sweep.out / COMMANDS_FILE
        seen = log.read_text().splitlines() if log.exists() else []
        if line not in seen:
            rundir.write_text(log, "".join(f"{s}\n" for s in [*seen, line]))


def run_sweep(sweep: Sweep, extra: list[str] | None = None, parallel: int = 1,
              dry_run: bool = False, argv: list[str] | None = None,
              log: Any = print) -> list[PlannedRun]:
    """Train every unfinished run of a sweep; return the plan (with states before running).

    ``parallel`` > 1 trains that many runs at once as ``python -m bitvit train`` subprocesses
    (several runs on one GPU); each writes its output to RUN/train.log.
    """
    plan = plan_sweep(sweep, extra)
    todo = [r for r in plan if r.state not in ("finished", "running")]
    for r in plan:
        log(f"{r.state:9s} {r.run_dir}")
    log(f"{len(plan)} runs: {len(plan) - len(todo)} finished or running, {len(todo)} to train")
    if dry_run or not todo:
        return plan
    _record_sweep(sweep, argv)
    if parallel <= 1:
        from bitvit.train import TrainingError

        failed = []
        for r in todo:
            try:
                _train_in_process(r, sweep, log, extra)
            except TrainingError as e:  # a diverged run: go on with the others, say so at the end
                log(f"FAILED    {r.run_dir}: {e}")
                failed.append(r.name)
        if failed:
            raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    else:
        _train_in_subprocesses(todo, sweep, parallel, log, extra)
    return plan


def _lock(r: PlannedRun, stack: contextlib.ExitStack, log: Any) -> int | None:
    """Take the run folder's lock (the one `bitvit train` holds) for ``stack``'s lifetime and
    return its descriptor; None, said in the log, when another process holds it."""
    try:
        return stack.enter_context(rundir.locked(r.run_dir))
    except rundir.RunBusyError:
        log(f"busy      {r.run_dir} (pid {rundir.holder(r.run_dir)} is training it)")
        return None


def _claim(r: PlannedRun, sweep: Sweep, extra: list[str] | None, log: Any) -> bool:
    """Under the run's lock: look at the folder again and, if it still needs training, set the
    run's state and command and move aside what a restarting folder holds (nothing is
    deleted). False: leave the run alone."""
    r.state = run_state(r.run_dir, r.config)
    if r.state in ("finished", "running"):
        return False
    r.command = train_command(sweep, r.point, r.run_dir, r.config, r.state, extra)
    log(f"{r.state:9s} {r.run_dir}: {shlex.join(r.command)}")
    if r.state == "restart":
        log(f"moved     {r.run_dir} aside to {rundir.move_aside(r.run_dir)}")
    return True


def _train_in_process(r: PlannedRun, sweep: Sweep, log: Any,
                      extra: list[str] | None = None) -> None:
    from bitvit.train import train

    with contextlib.ExitStack() as stack:
        if _lock(r, stack, log) is None or not _claim(r, sweep, extra, log):
            return
        # r.config is what r.command gives: train_command refuses a resume it cannot express.
        if r.state == "resume":
            train(r.config, resume=r.run_dir, quiet=True, command=r.command)
        else:
            train(r.config, out=r.run_dir, quiet=True, command=r.command)


def _python_bitvit() -> list[str]:
    """How a subprocess calls the command line (this interpreter, this package)."""
    return [sys.executable, "-m", "bitvit"]


def _train_in_subprocesses(todo: list[PlannedRun], sweep: Sweep, parallel: int,
                           log: Any, extra: list[str] | None = None) -> None:
    queue = list(todo)
    running: list[tuple[PlannedRun, subprocess.Popen, contextlib.ExitStack]] = []
    failed = []
    try:
        while queue or running:
            while queue and len(running) < parallel:
                r = queue.pop(0)
                stack = contextlib.ExitStack()
                fd = _lock(r, stack, log)
                if fd is None or not _claim(r, sweep, extra, log):
                    stack.close()
                    continue
                logfile = stack.enter_context((r.run_dir / "train.log").open("a"))
                cmd = [*_python_bitvit(), *r.command[1:]]
                # The child trains under the lock this process holds: it inherits it.
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                        pass_fds=(fd,),
                                        env={**os.environ, rundir.LOCK_FD_ENV: str(fd)})
                running.append((r, proc, stack))
            time.sleep(0.5)
            for item in list(running):
                r, proc, stack = item
                if proc.poll() is not None:
                    running.remove(item)
                    stack.close()
                    if proc.returncode != 0:
                        failed.append(r.name)
                    log(f"{'done' if proc.returncode == 0 else 'FAILED':9s} {r.run_dir}"
                        + ("" if proc.returncode == 0 else f" (see {r.run_dir}/train.log)"))
    finally:
        for _, proc, _ in running:  # interrupted: let each child mark its run interrupted
            proc.terminate()
        for _, proc, stack in running:
            proc.wait()
            stack.close()
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: dict[str, dict[str, Any]]
    info: dict[str, Any]  # run.json
    rows: list[dict[str, float]]  # metrics.csv

    @property
    def epochs_configured(self) -> int:
        return int(self.config.get("train", {}).get("epochs", 0))

    @property
    def finished(self) -> bool:
        return self.info.get("status") == "finished" and len(self.rows) == self.epochs_configured

    @property
    def wall_seconds(self) -> float:
        """Wall time over every invocation (the first run and each resume)."""
        parts = [self.info, *self.info.get("resumed_from", [])]
        return float(sum(p.get("wall_seconds") or 0.0 for p in parts))

    @property
    def seed(self) -> Any:
        return self.config.get("train", {}).get("seed")

    def final(self, metric: str) -> float:
        return self.rows[-1][metric]


def load_run(path: str | Path) -> Run:
    from bitvit.train import read_metrics

    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise SweepError(f"{path}: not a run folder (no config.yaml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise SweepError(f"{config_path}: expected a mapping")
    try:
        rows = read_metrics(path / "metrics.csv")
    except (ValueError, KeyError) as e:
        raise SweepError(f"{path / 'metrics.csv'}: unreadable ({e})") from None
    return Run(path, config, _read_json(path / "run.json"), rows)


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``; a folder that is not one stands for the run folders in it."""
    found = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(d for d in p.iterdir() if (d / "config.yaml").is_file()
                            and ".restart-" not in d.name)  # moved aside by a restart
        else:
            raise SweepError(f"{p}: no such run folder")
    if not found:
        raise SweepError(f"no run folders (with config.yaml) in {', '.join(map(str, paths))}")
    return found


# ---------------------------------------------------------------------------------------------
# Groups and the comparison
# ---------------------------------------------------------------------------------------------

DEFAULT_LAST_K = 5


def train_acc_column(run: Run) -> str:
    """``train_eval_acc`` (eval mode, a fixed training subset) where the run recorded it, else
    ``train_acc`` (the running average in train mode, dropout on, of runs from before)."""
    return "train_eval_acc" if run.rows and "train_eval_acc" in run.rows[0] else "train_acc"


def has_val(run: Run) -> bool:
    return bool(run.rows) and "val_acc" in run.rows[0]


def best_test_acc(run: Run) -> float:
    """Test accuracy at the epoch of highest validation accuracy (the first such epoch: the
    best/ checkpoint); without a validation split, the highest test accuracy (optimistic)."""
    if has_val(run):
        return max(run.rows, key=lambda row: row["val_acc"])["test_acc"]
    return max(row["test_acc"] for row in run.rows)


# What the table reports per run: metric -> function of (run, k of the last-k window).
METRICS: dict[str, Any] = {
    "last_test_acc": lambda r, k: last_k_mean([row["test_acc"] for row in r.rows], k),
    "final_test_acc": lambda r, k: r.final("test_acc"),
    "best_test_acc": lambda r, k: best_test_acc(r),
    "last_test_loss": lambda r, k: last_k_mean([row["test_loss"] for row in r.rows], k),
    "final_test_loss": lambda r, k: r.final("test_loss"),
    "train_acc": lambda r, k: last_k_mean([row[train_acc_column(r)] for row in r.rows], k),
    "gap": lambda r, k: last_k_mean(
        [row[train_acc_column(r)] - row["test_acc"] for row in r.rows], k),
    "epochs": lambda r, k: float(len(r.rows)),
    "wall_seconds": lambda r, k: r.wall_seconds,
}
# The metrics tested against full precision (one Holm family per table); accuracies use the
# accuracy margin, losses the loss margin.
TESTED = ["last_test_acc", "final_test_acc", "last_test_loss", "final_test_loss", "train_acc",
          "gap"]


def metric_labels(runs: list[Run], k: int) -> dict[str, str]:
    """Column names for a table of these runs; they say which train accuracy and which "best"
    the runs give (a table of old and new run folders says both)."""
    kinds = {train_acc_column(r) for r in runs if r.rows}
    train = ("eval mode" if kinds == {"train_eval_acc"} else "running, train mode"
             if kinds <= {"train_acc"} else "eval mode or running")
    vals = {has_val(r) for r in runs if r.rows}
    best = ("test acc at best val" if vals == {True} else "best test acc (optimistic)"
            if vals <= {False} else "test acc at best val, or best (optimistic)")
    return {"last_test_acc": f"test acc, last {k}", "final_test_acc": "test acc, final",
            "best_test_acc": best, "last_test_loss": f"test loss, last {k}",
            "final_test_loss": "test loss, final", "train_acc": f"train acc ({train}), last {k}",
            "gap": f"train-test gap, last {k}", "epochs": "epochs", "wall_seconds": "wall time"}


@dataclass
class Group:
    label: str
    key: dict[str, Any]  # experiment_key of its runs
    runs: list[Run]  # used in the statistics
    unfinished: list[Run] = field(default_factory=list)  # left out (or included, marked)
    stats: dict[str, Summary] = field(default_factory=dict)
    vs_fp: dict[str, Difference] = field(default_factory=dict)
    reference: str | None = None  # label of the full-precision group it is compared with

    @property
    def is_fp(self) -> bool:
        return self.key.get("quant.method") == FULL_PRECISION

    def values(self, metric: str, last_k: int = DEFAULT_LAST_K) -> list[float]:
        return [METRICS[metric](r, last_k) for r in self.runs if r.rows]


def _label_part(key: str, value: Any) -> str:
    if key == "quant.method":
        return str(value)
    if key == "quant.where":
        return str(value)
    if key == "quant.act_bits":
        return "act-fp" if value is None else f"act{value}"
    return f"{key.split('.')[1]}={_format_value(value)}"


def group_runs(runs: list[Run], include_unfinished: bool = False) -> list[Group]:
    """Group runs that differ only by seed (and settings in `IGNORED_KEYS`).

    Labels name what differs between groups (e.g. ``b158 all act8``); unfinished runs are kept
    apart in ``unfinished`` and, with ``include_unfinished``, also counted at their last epoch.
    """
    keyed: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for r in runs:
        key = experiment_key(r.config)
        keyed.setdefault(json.dumps(key, sort_keys=True, default=str), (key, []))[1].append(r)
    keys = [k for k, _ in keyed.values()]
    all_keys = sorted({k for key in keys for k in key})
    # A key names groups when it takes more than one value among the groups that have it (full
    # precision has no quant.where, and needs none in its label).
    differing = [k for k in all_keys if len({json.dumps(key[k], default=str)
                                              for key in keys if k in key}) > 1]
    order = ["quant.method", "quant.where", "quant.act_bits"]
    differing.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    if "quant.method" not in differing and any(k.startswith("quant.") for k in differing):
        differing.insert(0, "quant.method")
    groups = []
    for key, members in keyed.values():
        parts = [_label_part(k, key[k]) for k in differing if k in key]
        label = " ".join(parts) or str(key.get("quant.method", "runs"))
        done = [r for r in members if r.finished]
        unfinished = [r for r in members if not r.finished]
        used = done + (unfinished if include_unfinished else [])
        groups.append(Group(label, key, sorted(used, key=lambda r: str(r.seed)),
                            sorted(unfinished, key=lambda r: str(r.seed))))
    groups.sort(key=lambda g: (not g.is_fp, g.label))
    return groups


def _without_quant(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if not k.startswith("quant.")}


def compare_groups(groups: list[Group], margin: float = 0.01, loss_margin: float = 0.05,
                   alpha: float = 0.05, last_k: int = DEFAULT_LAST_K) -> list[Group]:
    """Fill each group's summaries and, for quantized groups, the differences to the
    full-precision group that matches it in everything but quantization, their Welch p-values
    Holm-adjusted over every difference of the comparison (one table, one family)."""
    if last_k < 1:
        raise SweepError(f"--last-k {last_k}: expected 1 or more epochs")
    for g in groups:
        g.stats = {m: summarize(g.values(m, last_k)) for m in METRICS}
    fps = [g for g in groups if g.is_fp]
    for g in groups:
        if g.is_fp:
            continue
        ref = next((f for f in fps if _without_quant(f.key) == _without_quant(g.key)), None)
        if ref is None:
            continue
        g.reference = ref.label
        for m in TESTED:
            g.vs_fp[m] = welch_difference(g.values(m, last_k), ref.values(m, last_k),
                                          loss_margin if "loss" in m else margin, alpha)
    adjust_holm([d for g in groups for d in g.vs_fp.values()])
    return groups


# ---------------------------------------------------------------------------------------------
# Table and figure
# ---------------------------------------------------------------------------------------------


def _fmt(x: float, metric: str) -> str:
    if math.isnan(x):
        return "n/a"
    if metric in ("wall_seconds",):
        return f"{x / 60:.1f} min"
    if metric == "epochs":
        return f"{x:.0f}"
    if "acc" in metric or metric == "gap":
        return f"{100 * x:.2f}"
    return f"{x:.4f}"


def _mean_std(s: Summary, metric: str) -> str:
    if s.n == 0:
        return "n/a"
    if metric == "epochs":  # a count, not a measurement: the range over seeds
        return f"{s.min:.0f}" if s.min == s.max else f"{s.min:.0f}–{s.max:.0f}"
    if s.n == 1:
        return f"{_fmt(s.mean, metric)} (1 seed)"
    return f"{_fmt(s.mean, metric)} ± {_fmt(s.std, metric)}"


def _signed(x: float, metric: str) -> str:
    text = _fmt(x, metric)
    return text if text.startswith("-") or text == "n/a" else f"+{text}"


def _devices(runs: list[Run]) -> list[str]:
    return sorted({str(r.info.get("device", "unknown device")) for r in runs})


def _amount(x: float, metric: str) -> str:
    """A margin in the metric's units: accuracy points, or loss."""
    return f"{100 * x:.2f} pts" if "acc" in metric or metric == "gap" else f"{x:.4f}"


def verdict_text(d: Difference, metric: str) -> str:
    """The verdict; an inconclusive one says why: a test significant only before Holm, a margin
    finer than the seeds can resolve, or a 90% CI that reaches past the margin."""
    if d.verdict != "inconclusive":
        return d.verdict if d.available else f"n/a: {d.reason}"
    why = []
    if d.p_value < d.alpha:
        why.append(f"Welch p < {d.alpha:g} only before Holm")
    margin = _amount(d.margin, metric)
    if d.resolvable >= d.margin:
        why.append(f"resolvable margin {_amount(d.resolvable, metric)} > {margin}")
    else:
        why.append(f"{100 - 200 * d.alpha:g}% CI reaches past ±{margin}")
    return "inconclusive: " + "; ".join(why)


def _notes(runs: list[Run], k: int) -> list[str]:
    """What the table's columns are: the last-k window, which best, which train accuracy."""
    with_rows = [r for r in runs if r.rows]
    short = sorted({len(r.rows) for r in with_rows if len(r.rows) < k})
    window = (f"Last {k}: the mean over each run's last {k} epochs (a steadier headline than the "
              "final epoch alone)" + (f"; runs with fewer epochs ({', '.join(map(str, short))}) "
                                      "give the mean of all of theirs" if short else "") + ".")
    vals = {has_val(r) for r in with_rows}
    best = []
    if True in vals:
        best.append("test acc at best val is the test accuracy at the epoch of highest "
                    "validation accuracy (the best/ checkpoint)")
    if False in vals:
        best.append("best test acc is the maximum over epochs, picked on the test set "
                    "(optimistic)")
    kinds = {train_acc_column(r) for r in with_rows}
    train = []
    if "train_eval_acc" in kinds:
        train.append("train acc (eval mode) is the model in eval mode on a fixed class-balanced "
                     "subset of up to 10,000 training images (train_eval_acc)")
    if "train_acc" in kinds:
        train.append("train acc (running, train mode) is the running average over each epoch "
                     "in train mode (train_acc: dropout on, weights changing; these runs predate "
                     "the eval-mode train accuracy)" if kinds == {"train_acc"} else
                     "runs without train_eval_acc give their running train-mode average "
                     "(train_acc)")
    return [window, _sentence(best), _sentence(train)[:-1] + "; the train-test gap is that "
            "accuracy minus test accuracy, epoch by epoch, averaged over the same window."]


def _sentence(parts: list[str]) -> str:
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def compare_markdown(groups: list[Group], runs: list[Run], full_epochs: int | None = None,
                     figure: str | None = None, last_k: int = DEFAULT_LAST_K) -> str:
    """The comparison as Markdown: provenance, per-group table, differences to fp, unfinished."""
    lines = []
    configured = sorted({r.epochs_configured for r in runs})
    lines.append(f"Runs: {len(runs)} (device: {'; '.join(_devices(runs))}).")
    budget = f"Epochs configured: {', '.join(map(str, configured))}"
    if full_epochs and any(e < full_epochs for e in configured):
        budget += (f" — shortened budget: {', '.join(map(str, configured))} of {full_epochs} "
                   "epochs; every number below comes from the shortened runs")
    lines.append(budget + ".")
    limits = sorted({str(r.config.get("data", {}).get("limit_train")) for r in runs})
    if limits != ["None"]:
        lines.append(f"Training images: class-balanced subset of {', '.join(limits)} "
                     "(data.limit_train).")
    lines.append("")
    lines.append("Mean ± std (ddof 1) over seeds; accuracies in %. "
                 + " ".join(_notes(runs, last_k)))
    lines.append("")
    cols = list(METRICS)
    labels = metric_labels(runs, last_k)
    lines.append("| group | seeds | " + " | ".join(labels[m] for m in cols) + " |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for g in groups:
        seeds = ", ".join(str(r.seed) for r in g.runs) or "none"
        marks = [f"{len(g.unfinished)} unfinished"] if g.unfinished else []
        cells = [_mean_std(g.stats[m], m) for m in cols]
        lines.append(f"| {g.label}{' (' + ', '.join(marks) + ')' if marks else ''} | {seeds} | "
                     + " | ".join(cells) + " |")
    compared = [g for g in groups if g.vs_fp]
    if compared:
        margins = next(iter(compared)).vs_fp
        acc_m = 100 * margins["final_test_acc"].margin
        loss_m = margins["final_test_loss"].margin
        tests = sum(d.available for g in compared for d in g.vs_fp.values())
        lines += ["", f"Differences to full precision (group − fp, matched in everything but "
                  f"quantization): 95% confidence interval (Welch–Satterthwaite); Welch t-test "
                  f"p-value, raw and Holm-adjusted over the {tests} tests of this table (differs: "
                  f"Holm p < 0.05); TOST equivalence p-value at a margin of ±{acc_m:g} accuracy "
                  f"points and ±{loss_m:g} loss (equivalent: TOST p < 0.05). Resolvable margin: "
                  f"the half-width of the 90% confidence interval (Welch), the smallest margin "
                  f"TOST can confirm with these seeds even for a difference of zero.", ""]
        lines.append("| group | metric | difference [95% CI] | Welch p | Holm p | TOST p "
                     "| resolvable margin | verdict |")
        lines.append("|---" * 8 + "|")
        for g in compared:
            for m, d in g.vs_fp.items():
                if d.available:
                    diff = (f"{_signed(d.diff, m)} [{_signed(d.ci_low, m)}, "
                            f"{_signed(d.ci_high, m)}]")
                    lines.append(f"| {g.label} | {labels[m]} | {diff} | {d.p_value:.3g} | "
                                 f"{d.p_adjusted:.3g} | {d.tost_p:.3g} | "
                                 f"{_amount(d.resolvable, m)} | {verdict_text(d, m)} |")
                else:
                    lines.append(f"| {g.label} | {labels[m]} | {_signed(d.diff, m)} | n/a | n/a "
                                 f"| n/a | n/a | {verdict_text(d, m)} |")
    unfinished = [r for g in groups for r in g.unfinished]
    if unfinished:
        counted = any(r in g.runs for g in groups for r in g.unfinished)
        lines += ["", "Unfinished runs (" + ("counted at their last epoch" if counted
                                             else "left out of the statistics") + "):"]
        for r in unfinished:
            lines.append(f"- {r.path.name}: {len(r.rows)} of {r.epochs_configured} epochs, "
                         f"status {r.info.get('status', 'unknown')}")
    if figure:
        lines += ["", f"![loss and accuracy per epoch]({figure})"]
    return "\n".join(lines) + "\n"


def provenance(runs: list[Run], full_epochs: int | None = None) -> str:
    """Where and how long the runs trained, e.g. ``device: cpu (...); 15 of 100 epochs``; the
    figure carries it so that it never travels without its device and budget."""
    configured = ", ".join(map(str, sorted({r.epochs_configured for r in runs}))) or "0"
    budget = f"{configured} of {full_epochs} epochs" if full_epochs else f"{configured} epochs"
    return f"device: {'; '.join(_devices(runs)) or 'none'}; {budget}"


def plot_groups(groups: list[Group], path: str | Path, title: str = "",
                full_epochs: int | None = None) -> Any:
    """Loss and accuracy per epoch (train solid, test dashed), one color per group: the mean
    over seeds with a min-max band, over the epochs every run of the group has. The title says
    on what device the plotted runs trained and their budget (of ``full_epochs`` when given).
    Returns the (closed) matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    shown = [g for g in groups if any(r.rows for r in g.runs)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.12 * len(shown)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, g in enumerate(shown):
        # The default cycle for a few groups; tab20 once there are more than it has colors.
        color = colors[i] if len(shown) <= len(colors) else plt.cm.tab20(i % 20)
        runs = [r for r in g.runs if r.rows]
        n = min(len(r.rows) for r in runs)
        epochs = np.arange(1, n + 1)
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, style in (("train", "-"), ("test", "--")):
                values = np.array([[row[f"{split}_{metric}"] for row in r.rows[:n]]
                                   for r in runs])
                ax.plot(epochs, values.mean(0), style, color=color)
                if len(runs) > 1:
                    ax.fill_between(epochs, values.min(0), values.max(0), color=color,
                                    alpha=0.15, linewidth=0)
        handles.append(Line2D([], [], color=color, label=f"{g.label} (n={len(runs)})"))
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles += [Line2D([], [], color="gray", linestyle="-", label="train"),
                Line2D([], [], color="gray", linestyle="--", label="test")]
    # One entry per group, below the panels, so many groups never cover the curves.
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    legend = "mean over seeds, band: min-max over seeds; train solid, test dashed"
    lines = [title, provenance([r for g in shown for r in g.runs if r.rows], full_epochs), legend]
    fig.suptitle("\n".join(line for line in lines if line), fontsize=10)
    rows = -(-len(handles) // min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def compare(paths: list[str | Path], out: str | Path | None = None, margin: float = 0.01,
            loss_margin: float = 0.05, include_unfinished: bool = False,
            full_epochs: int | None = None, title: str = "",
            last_k: int = DEFAULT_LAST_K) -> tuple[list[Group], str]:
    """Load, group and compare run folders; with ``out``, write compare.md and compare.png.
    ``last_k``: the window of the last-k means (test accuracy and loss, train accuracy, gap)."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    groups = compare_groups(group_runs(runs, include_unfinished), margin, loss_margin,
                            last_k=last_k)
    figure = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_groups(groups, out / "compare.png", title, full_epochs)
        figure = "compare.png"
    text = compare_markdown(groups, runs, full_epochs, figure, last_k)
    if out is not None:
        (out / "compare.md").write_text(text)
    return groups, text


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _study_sweeps(results: Path, studies: Path | None) -> list[Sweep]:
    """Sweep files of the studies (studies/*.yaml) and copies in results/*/sweep.yaml, one per
    output folder (the studies/ file wins: it says what is planned)."""
    sweeps: dict[str, Sweep] = {}
    sources = sorted(studies.glob("*.yaml")) if studies and studies.is_dir() else []
    sources += sorted(results.glob(f"*/{SWEEP_COPY}"))
    for path in sources:
        sweep = load_sweep(path)
        sweeps.setdefault(str(sweep.out.resolve()), sweep)
    return list(sweeps.values())


def write_report(results: str | Path = "results", studies: str | Path | None = "studies",
                 margin: float = 0.01, loss_margin: float = 0.05,
                 last_k: int = DEFAULT_LAST_K) -> Path:
    """Regenerate RESULTS/README.md (and each study's compare.md, compare.png) from the
    committed run folders; grid points without a run folder are listed as not run."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    sweeps = _study_sweeps(results, Path(studies) if studies else None)
    lines = ["# Results", "",
             "Generated by `bitvit report` from the run folders below (metrics.csv, config.yaml, "
             "run.json); do not edit by hand. Each run's exact `bitvit train` command is in its "
             "run.json.", ""]
    for sweep in sweeps:
        out = sweep.out
        rel = _relative(out, results)
        lines += [f"## {sweep.title}", ""]
        if sweep.question:
            lines += [f"Question: {sweep.question}", ""]
        lines.append(f"Sweep file: `{sweep.path}`; base config `{sweep.base}`"
                     + (f", overrides `{' '.join(sweep.overrides)}`" if sweep.overrides else "")
                     + f"; run folders in `{rel}/`.")
        commands_file = out / COMMANDS_FILE
        commands = (commands_file.read_text().splitlines() if commands_file.is_file() else [])
        lines += ["", "Commands:", "", "```",
                  *(commands or [f"bitvit sweep {sweep.path}   # not run yet"]), "```", ""]
        planned = sweep.run_dirs()
        present = {n for n in planned if (out / n / "config.yaml").is_file()}
        missing = [n for n in planned if n not in present]
        if present:
            _, text = compare([out / n for n in planned if n in present], out=out, margin=margin,
                              loss_margin=loss_margin, full_epochs=sweep.full_epochs,
                              title=sweep.title, last_k=last_k)
            text = text.replace("](compare.png)", f"]({rel}/compare.png)")
            lines += [text.rstrip(), ""]
        if missing and not present:  # a list of every grid point would drown the page
            lines += [f"Not run: all {len(planned)} planned runs (`bitvit sweep {sweep.path} "
                      "--dry-run` lists them).", ""]
        elif missing:
            lines += [f"Not run ({len(missing)} of {len(planned)}): "
                      + ", ".join(f"`{n}`" for n in missing) + ".", ""]
    path = results / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
