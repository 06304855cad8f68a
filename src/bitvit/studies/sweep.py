"""Sweep files: their schema, the runs they name, what state each run folder is in, and
the plan (the `bitvit train` command per run); `bitvit.studies.schedule` trains the plan.

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
    runs_root: ~/.cache/bitvit/runs   # optional: train in RUNS_ROOT/<out's name>/NAME instead
                                      # (outside the work tree; $BITVIT_RUNS_ROOT overrides) and
                                      # copy the small files (metrics.csv, config.yaml, run.json,
                                      # curves.png) into out/NAME before, during and after
    runs:                             # optional: a list of sub-grids; their union ...
      - {quant.method: [sign, xnor], quant.where: [all, mlp, attn], quant.act_bits: [none, 1]}
      - {quant.method: [fp, b158]}
    grid:                             # ... is crossed with this grid (cartesian product;
      train.seed: [0, 1, 2]           # a key a runs entry sets keeps the entry's values)

Without ``runs`` the points are the grid's cartesian product. A value may be a scalar (one
choice) or a list; a key of a nested section is ``section.sub.key`` (``train.distill.kind``).
Each point is one run folder under ``out``, named from its values in the order of the file
(``runs`` keys, then ``grid`` keys), e.g. ``method=b158_seed=0`` or
``method=sign_where=mlp_act_bits=1_seed=2`` (the last part of the key, or the whole key with
``-`` for ``.`` when two keys share a last part; characters outside ``[A-Za-z0-9.+-]`` become
``-``). Runs are trained
grid-major: every ``runs`` point at the first grid point (seed 0) before any at the second.

Limits, each a one-line `SweepError` naming the file: at most ``MAX_SWEEP_RUNS`` (10,000) runs,
counted from the lists' lengths (grid points times ``runs`` points, before duplicates are
dropped) before any point is built; at most ``MAX_SWEEP_KEYS`` (100) keys; a run name of at
most 255 bytes. Like a config, the file is YAML without anchors on lists or mappings (an alias
bomb) and nested at most 100 deep (`bitvit.files.load_yaml`).

``bitvit.studies.schedule.run_sweep`` skips finished runs (run.json says finished and every
epoch is in metrics.csv; with a runs root, also a run whose folder there is gone or unfinished
while ``out`` holds its finished small files) and runs whose ``bitvit train`` is alive (it holds
the run folder's lock), resumes runs that have a checkpoint, and restarts the others from
scratch, moving what they hold aside to ``NAME.restart-TIME/`` (a sweep deletes no run folder; a
sync mirrors a restarted run's small files into ``out``, see `sync_results`), so a sweep can be
stopped and started again at will. Extra overrides given to the sweep apply to new runs; a
resumed run keeps its own config.yaml except ``train.epochs`` and ``data.path`` (what ``bitvit
train --resume`` can change), and an extra override it could not honour is refused (a finished
run is not checked against extra overrides: it is skipped). Weights stay in the run folders
(``last/``, ``best/``) for export and evaluation; ``.gitignore`` keeps them out of ``results/``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bitvit import files
from bitvit.nn.methods import FULL_PRECISION
from bitvit.nn.quant import resolve_act_bits
from bitvit.training import rundir
from bitvit.training.config import (
    Config,
    ConfigError,
    apply_overrides,
    flat_keys,
    load_config,
    read_yaml_mapping,
    short_repr,
)

SWEEP_KEYS = {"title", "question", "base", "overrides", "full_epochs", "out", "runs_root", "runs",
              "grid"}
RUNS_ROOT_ENV = "BITVIT_RUNS_ROOT"  # overrides a sweep file's runs_root
SWEEP_COPY = "sweep.yaml"
COMMANDS_FILE = "commands.txt"
# A sweep file's size says little about its runs (nine keys of ten values are 10**9 of them):
# the count is checked from the lists' lengths before any point is built. Each run is a training
# run; a config has fewer keys than MAX_SWEEP_KEYS; a run's folder name is one path component.
MAX_SWEEP_RUNS = 10_000
MAX_SWEEP_KEYS = 100
MAX_NAME_BYTES = 255


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
    runs_root: Path | None = None  # run folders live here (outside the work tree), not in out

    def name(self, point: dict[str, Any]) -> str:
        return run_name(point, self.keys)

    def run_dir(self, name: str) -> Path:
        """Where the run trains: ``out/NAME``, or ``RUNS_ROOT/<out's name>/NAME`` with a runs
        root, whose small files `sync_results` copies into ``out/NAME``."""
        if self.runs_root is None:
            return self.out / name
        return self.runs_root / self.out.name / name

    def run_dirs(self) -> dict[str, dict[str, Any]]:
        """Run folder name -> point, in sweep order."""
        return {self.name(p): p for p in self.points}


def _choices(grid: Any, where: str) -> dict[str, list[Any]]:
    """A {section.key: value or [values]} mapping checked, each value as its list of choices."""
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: expected a mapping of section.key to a list of values")
    for key in grid:
        if not isinstance(key, str) or "." not in key or not all(key.split(".")):
            raise SweepError(f"{where}: key {short_repr(key)}: expected section.key "
                             "(e.g. quant.method)")
    choices = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    for key, values in choices.items():
        if not values:
            raise SweepError(f"{where}: {key} has an empty list of values")
    return choices


def _product(choices: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of `_choices`: one {section.key: value} per point."""
    return [dict(zip(choices, combo, strict=True))
            for combo in itertools.product(*choices.values())]


def _hashable(value: Any) -> Any:
    """A value as a hashable key that is equal where the values are (YAML's lists, mappings
    and sets), so that duplicate points are found in a set rather than a list. Numbers are one
    key by value (0 and 0.0 configure the same run, kept once), but false is not 0."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, set):
        return ("set", frozenset(_hashable(v) for v in value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    return (type(value).__name__, value)


def _points(path: Path, grid: dict[str, list[Any]], runs: list[dict[str, list[Any]]]
            ) -> list[dict[str, Any]]:
    """The sweep's points in training order, duplicates dropped; refused when more than
    MAX_SWEEP_RUNS, counted from the lists' lengths before anything is built."""
    count = math.prod(map(len, grid.values())) * sum(
        math.prod(map(len, sub.values())) for sub in runs)
    if count > MAX_SWEEP_RUNS:
        raise SweepError(f"{path}: the grid and runs give {count:,} runs; a sweep file may give "
                         f"at most {MAX_SWEEP_RUNS:,} (split it into several)")
    arms = [(i, arm) for i, sub in enumerate(runs) for arm in _product(sub)]
    # The grid is the outer loop (every arm gets seed 0 before any gets seed 1), so a sweep
    # stopped early leaves every configuration with some seeds rather than some with none.
    # A key a runs entry sets is not crossed with the grid: the entry's values replace the
    # grid's for that key (e.g. one method's extra learning rate).
    points: list[dict[str, Any]] = []
    seen: set[tuple[int, Any]] = set()
    for g in _product(grid):
        for i, arm in arms:
            point = {**{k: v for k, v in g.items() if k not in arm}, **arm}
            key = (i, _hashable(point))
            if key not in seen:
                seen.add(key)
                points.append(point)
    return points


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (see the module docstring for its schema)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", "keys base, out, grid (and runs)", SweepError)
    unknown = sorted(set(raw) - SWEEP_KEYS, key=str)
    if unknown:
        raise SweepError(f"{path}: unknown key {short_repr(unknown[0])}; valid keys: "
                         f"{', '.join(sorted(SWEEP_KEYS))}")
    for key in ("base", "out"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():  # '' would be the cwd
            raise SweepError(f"{path}: {key!r} must be a path (relative to the working directory)")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: 'overrides' must be a list of section.key=value strings")
    runs = raw.get("runs")
    if runs is not None and (not isinstance(runs, list) or not runs):
        raise SweepError(f"{path}: 'runs' must be a non-empty list of mappings")
    grid = _choices(raw.get("grid"), f"{path}: grid")
    subs = [{}] if runs is None else [
        _choices(sub, f"{path}: runs[{i}]") for i, sub in enumerate(runs)]
    # Names list the runs' own keys first, then the grid's (e.g. method=sign_where=mlp_seed=0).
    keys = list(dict.fromkeys([*(k for sub in subs for k in sub), *grid]))
    if not keys:
        raise SweepError(f"{path}: no grid: give 'grid' and/or 'runs' with at least one key")
    if len(keys) > MAX_SWEEP_KEYS:
        raise SweepError(f"{path}: the grid and runs vary {len(keys):,} keys; a sweep file may "
                         f"vary at most {MAX_SWEEP_KEYS}")
    points = _points(path, grid, subs)
    full_epochs = raw.get("full_epochs")
    if full_epochs is not None and (type(full_epochs) is not int or full_epochs < 1):  # not true
        raise SweepError(f"{path}: 'full_epochs' must be a positive integer")
    runs_root = raw.get("runs_root")
    if runs_root is not None and not isinstance(runs_root, str):
        raise SweepError(f"{path}: 'runs_root' must be a path (~ allowed)")
    if runs_root is not None:
        runs_root = Path(os.environ.get(RUNS_ROOT_ENV) or runs_root).expanduser()
    sweep = Sweep(path=path, base=raw["base"], out=Path(raw["out"]), overrides=list(overrides),
                  points=points, keys=keys, title=str(raw.get("title") or path.stem),
                  question=str(raw.get("question") or ""), full_epochs=full_epochs,
                  runs_root=runs_root)
    _check_names(sweep)
    return sweep


def _check_names(sweep: Sweep) -> None:
    """Each run's folder name fits a file system (one at a time: a long value repeated in 10,000
    names would be gigabytes) and is given once."""
    names = []
    for point in sweep.points:
        name = sweep.name(point)
        if len(name.encode()) > MAX_NAME_BYTES:
            raise SweepError(f"{sweep.path}: run name {short_repr(name)} is "
                             f"{len(name.encode()):,} bytes; a folder name is at most "
                             f"{MAX_NAME_BYTES} (shorten the values)")
        names.append(name)
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise SweepError(f"{sweep.path}: the grid gives run {duplicates[0]} more than once")


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-"))
            for k, s in zip(keys, last, strict=True)}


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def run_name(point: dict[str, Any], keys: list[str] | None = None) -> str:
    """A short, filesystem-safe, stable folder name from a point's values, e.g. method=b158_seed=0.

    ``keys`` (all keys of the sweep, in order) fixes the order and the short names; keys absent
    from this point are left out of its name.
    """
    keys = keys or list(point)
    short = _short_keys(keys)
    return "_".join(f"{short[k]}={format_value(point[k])}" for k in keys if k in point)


def point_overrides(point: dict[str, Any]) -> list[str]:
    """The point as section.key=value overrides (JSON values, which YAML parses back exactly;
    what JSON lacks, such as a YAML date, as its text, for the config to name)."""
    return [f"{k}={json.dumps(v, default=str)}" for k, v in point.items()]


def sweep_config(sweep: Sweep, point: dict[str, Any], extra: list[str] | None = None,
                 base: dict[str, Any] | None = None) -> Config:
    """A run's config: the base file, the sweep's overrides, ``extra``, the point's. ``base``:
    the base file as read already (`plan_sweep` reads it once, not once per run)."""
    overrides = [*sweep.overrides, *(extra or []), *point_overrides(point)]
    # Named as the sweep file on its base: a bad value may come from either.
    source = f"{sweep.path} (base {sweep.base})"
    if base is None:
        base = read_yaml_mapping(sweep.base, "config file", "sections model, quant, data, train")
    return Config.from_dict(apply_overrides(base, overrides), source)


# ---------------------------------------------------------------------------------------------
# Run folders: what state they are in
# ---------------------------------------------------------------------------------------------

# Settings that do not change what a run measures: left out when grouping runs and when checking
# a run folder against its sweep. A distillation teacher is known by its file's sha256
# (train.distill.teacher_sha256), not by where the file is (a path differs between machines);
# its test accuracy is a measurement of it.
IGNORED_KEYS = {
    "train.seed", "train.device", "train.compile", "train.eval_batch_size",
    "data.path", "data.download", "data.download_url", "data.download_md5", "data.cache_dir",
    "train.distill.teacher", "train.distill.teacher_test_acc",
}
DISTILL = "train.distill."
# What tells a run folder apart from the run a sweep asks for: all it measures, and its seed
# (groups pool seeds; a folder is one seed's run), but not its length (a run may be extended).
RUN_IGNORED_KEYS = (IGNORED_KEYS - {"train.seed"}) | {"train.epochs"}


def _flatten(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`flat_keys` of a config's sections, an empty section (None in YAML) as no keys; a
    section that is no mapping is a TypeError."""
    sections = {section: values or {} for section, values in config_dict.items()}
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise TypeError(f"section {section!r} is not a mapping")
    return flat_keys(sections)


def experiment_key(config_dict: dict[str, dict[str, Any]], ignore: set[str] = IGNORED_KEYS
                   ) -> dict[str, Any]:
    """A flat {section.key: value} (``section.sub.key`` in nested sections) of what a run
    measures; quantization and distillation settings normalized.

    ``act_bits: default`` becomes the bits it means; full precision (``method: fp`` or
    ``where: none``) drops every other quant key, since none of them does anything then.
    Without a teacher every ``train.distill`` key is dropped (a run from before distillation
    has none), and hard distillation drops the temperature, which only soft uses.
    """
    flat = _flatten(config_dict)
    method = flat.get("quant.method", FULL_PRECISION)
    if method == FULL_PRECISION or flat.get("quant.where") == "none":
        for k in [k for k in flat if k.startswith("quant.")]:
            del flat[k]
        flat["quant.method"] = FULL_PRECISION
    elif "quant.act_bits" in flat:
        flat["quant.act_bits"] = resolve_act_bits(method, flat["quant.act_bits"])
    if flat.get(f"{DISTILL}teacher") is None:
        flat = {k: v for k, v in flat.items() if not k.startswith(DISTILL)}
    elif flat.get(f"{DISTILL}kind") == "hard":
        flat.pop(f"{DISTILL}temperature", None)
    return {k: v for k, v in sorted(flat.items()) if k not in ignore}


# Settings a planned config may give as ``auto`` (or leave null) while its run records what they
# resolved to (the same for the same data, the same teacher file): they never make another
# experiment. The teacher's sha256 is recorded when its run starts.
AUTO_KEYS = frozenset({"data.mean", "data.std", "train.distill.teacher_sha256"})


def same_setting(key: str, saved: Any, wanted: Any) -> bool:
    """Whether a run folder's experiment_key value matches the one a sweep asks for.

    A run records the numbers ``data.mean``/``data.std: auto`` resolved to, and auto resolves
    the same way for the same data, so auto on either side matches any numbers; likewise the
    teacher's sha256, which a run records and a sweep leaves unset.
    """
    # A planned teacher_sha256 is None: the run records the sha256 of the file it found.
    auto = key in AUTO_KEYS and any(v == "auto" or v is None for v in (saved, wanted))
    return auto or saved == wanted


def planned_key(config: dict[str, Any], also_ignore: frozenset[str] = frozenset()
                ) -> dict[str, Any]:
    """A key that groups planned configs with the run folders they became (the learning-rate
    tables): the `experiment_key` less the epochs (a run may be extended), the normalization
    (`same_setting`'s rule, coarsened: no study varies it) and ``also_ignore``."""
    return experiment_key(config, IGNORED_KEYS | AUTO_KEYS | {"train.epochs"} | also_ignore)


def _count_rows(path: Path) -> int:
    """The epochs metrics.csv records; a garbage file is a one-line `rundir.RunFolderError`."""
    return len(rundir.read_metrics(path)) if path.is_file() else 0


def check_same_experiment(run_dir: Path, config: Config) -> None:
    """`SweepError` when ``run_dir``'s config.yaml is of another run than ``config`` (its
    length aside: a run may be extended); nothing for a folder without one."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    saved_dict = read_yaml_mapping(saved_path, "run config", "sections model, quant, data, "
                                   "train", SweepError)
    try:
        saved = experiment_key(saved_dict, RUN_IGNORED_KEYS)
    except (ValueError, TypeError, AttributeError) as e:  # a section that is no mapping
        raise SweepError(f"{saved_path}: not a run config bitvit wrote ({e}); move the "
                         "folder away or change 'out'") from None
    wanted = experiment_key(config.to_dict(), RUN_IGNORED_KEYS)
    differing = [k for k in sorted(set(saved) | set(wanted))
                 if not same_setting(k, saved.get(k), wanted.get(k))]
    if differing:
        k = differing[0]
        raise SweepError(f"{run_dir}: holds a run with {k}={saved.get(k)!r} but the sweep "
                         f"asks {k}={wanted.get(k)!r}; move the folder away or change 'out'")


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
    check_same_experiment(run_dir, config)
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
        return files.pid_alive(pid) and not _pid_started_after(pid, info.get("start"))
    return _recently_active(run_dir)


def _pid_started_after(pid: int, start: Any, slack: float = 5.0) -> bool:
    """Whether process ``pid`` started after the run's recorded start (ISO time): then the pid
    was reused by another process after the trainer died. False when unknown (no /proc)."""
    try:
        started = datetime.fromisoformat(str(start)).timestamp()
    except ValueError:
        return False
    process_start = files.process_start(pid)
    # slack: start is recorded in whole seconds
    return process_start is not None and process_start > started + slack


def _recently_active(run_dir: Path, min_seconds: float = 1800.0) -> bool:
    """Whether a run folder changed within max(min_seconds, 3 x its longest epoch). The lock
    file does not count: the sweep itself rewrites it when it takes the lock to look."""
    try:
        longest = max((r.get("seconds", 0.0) for r in rundir.read_metrics(run_dir)),
                      default=0.0)
    except (ValueError, KeyError):
        longest = 0.0
    newest = max((f.stat().st_mtime for f in run_dir.iterdir() if f.name != rundir.LOCK),
                 default=0.0)
    return time.time() - newest < max(min_seconds, 3 * longest)


# ---------------------------------------------------------------------------------------------
# The plan: each run's state and its `bitvit train` command
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
    base = read_yaml_mapping(sweep.base, "config file", "sections model, quant, data, train",
                             ConfigError)
    for name, point in sweep.run_dirs().items():
        config = sweep_config(sweep, point, extra, base)
        run_dir = sweep.run_dir(name)
        state = run_state(run_dir, config)
        # A finished copy in out stands for a run folder that is gone (another machine), or
        # that holds less of the run (a stale folder put back): its results are not retrained.
        if state in ("new", "resume", "restart") and _finished_copy(sweep, name, config):
            run_dir, state = sweep.out / name, "finished"
        command = train_command(sweep, point, run_dir, config, state, extra)
        plan.append(PlannedRun(name, run_dir, point, config, state, command))
    return plan


def folder_finished(run_dir: Path) -> bool:
    """Whether a run folder (or its copy) says finished and holds every epoch its config asks."""
    try:
        epochs = int((read_yaml_mapping(run_dir / "config.yaml", "run config", "sections",
                                        SweepError).get("train") or {}).get("epochs", 0))
        return (rundir.read_info(run_dir).get("status") == "finished"
                and _count_rows(run_dir / "metrics.csv") == epochs)
    except (SweepError, rundir.RunFolderError, ValueError, TypeError, AttributeError):
        return False


def _finished_copy(sweep: Sweep, name: str, config: Config) -> bool:
    """With a runs root: whether ``out`` holds the small files of the run ``name`` finished (its
    results stand; only its weights are lost: train it again by hand to have them)."""
    copy = sweep.out / name
    return (sweep.runs_root is not None and copy.is_dir()
            and run_state(copy, config) == "finished")


# What `bitvit train --resume DIR` cannot change (it takes only --data, --teacher and --epochs,
# and the run records its teacher's test accuracy itself): a sweep asking a resumed run for
# another value of one of these is refused rather than ignored.
RESUME_KEEPS = sorted(IGNORED_KEYS - {"data.path", "train.distill.teacher",
                                      "train.distill.teacher_test_acc"})


def train_command(sweep: Sweep, point: dict[str, Any], run_dir: Path, config: Config,
                  state: str, extra: list[str] | None = None) -> list[str]:
    """The `bitvit train` command that trains a run folder in ``state``; the one-at-a-time path
    records it and the parallel path runs it, so both do the same.

    A new run gets every override (the sweep's, ``extra``, the point's). A resumed run keeps its
    own config.yaml: ``--epochs`` and, when the sweep moves the data or the teacher, ``--data``
    and ``--teacher`` carry what a resume can change; any other setting that differs from the
    run's own raises `SweepError`.
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
    teacher = f"{DISTILL}teacher"
    if saved.get(teacher) is not None and wanted.get(teacher) != saved.get(teacher):
        command += ["--teacher", str(config.train.distill.teacher)]
    return command
