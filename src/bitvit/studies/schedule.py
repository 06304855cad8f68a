"""Running a sweep: train every unfinished run of its plan, one at a time in this process or
several at once as `bitvit train` subprocesses, under each run folder's lock, and copy the
small files of runs trained under a runs root into the sweep's ``out``."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitvit import files
from bitvit.studies.sweep import (
    COMMANDS_FILE,
    SWEEP_COPY,
    PlannedRun,
    Sweep,
    SweepError,
    check_same_experiment,
    folder_finished,
    plan_sweep,
    run_state,
    sweep_config,
    train_command,
)
from bitvit.training import rundir
from bitvit.training.config import read_yaml_mapping

if TYPE_CHECKING:
    from bitvit.training.config import Config
    from bitvit.training.distill import TeacherLoader

# With ``runs_root``, what a sweep copies from each run folder into ``out`` (never weights).
SMALL_FILES = (rundir.METRICS, rundir.CONFIG, rundir.RUN_JSON, rundir.CURVES)


def _without_env(line: str) -> str:
    """A recorded command without its leading ``VAR=value`` settings: ``OMP_NUM_THREADS=1 bitvit
    sweep S`` already records the command ``bitvit sweep S`` (a comment stays as it is)."""
    words = line.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words.pop(0)
    return " ".join(words)


def _record_sweep(sweep: Sweep, argv: list[str] | None) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    copy = sweep.out / SWEEP_COPY
    text = f"# copied from {sweep.path} by bitvit sweep\n" + sweep.path.read_text()
    if not copy.exists() or copy.read_text() != text:
        files.write_text(copy, text)
    if argv:
        line = shlex.join(argv)
        log = sweep.out / COMMANDS_FILE
        seen = log.read_text().splitlines() if log.exists() else []
        if line not in {_without_env(s) for s in seen}:
            files.write_text(log, "".join(f"{s}\n" for s in [*seen, line]))


def sync_results(sweep: Sweep, extra: list[str] | None = None) -> list[str]:
    """With a runs root: copy each run folder's small files (`SMALL_FILES`) into ``out/NAME``,
    so that results/ holds what a report needs while the weights stay outside the work tree.
    The copy mirrors the run folder: a small file the run folder lacks is an earlier attempt's
    (a restart after the runs root was lost) and is removed, so that no report mixes the two;
    git keeps what was committed. A run folder that is gone (another machine) leaves its
    earlier copy alone, and so does one `_may_replace` refuses (another experiment than the
    sweep's with ``extra``, or a stale attempt beside a finished copy). Returns the names
    copied."""
    if sweep.runs_root is None:
        return []
    copied = []
    base = read_yaml_mapping(sweep.base, "config file", "sections model, quant, data, train")
    for name, point in sweep.run_dirs().items():
        src, dst = sweep.run_dir(name), sweep.out / name
        present = [f for f in SMALL_FILES if (src / f).is_file()]
        if rundir.CONFIG not in present or not _may_replace(
                dst, src, sweep_config(sweep, point, extra, base)):
            continue
        try:
            # run.json first: read before the metrics, a "finished" comes with every epoch.
            snapshot = {f: (src / f).read_bytes()
                        for f in sorted(present, key=lambda f: f != rundir.RUN_JSON)}
        except FileNotFoundError:  # moved aside meanwhile (a restart): the next sync copies it
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for f, data in snapshot.items():
            if not (dst / f).is_file() or (dst / f).read_bytes() != data:
                files.atomic_file(dst / f, lambda tmp, data=data: tmp.write_bytes(data))
        for f in set(SMALL_FILES) - set(present):
            (dst / f).unlink(missing_ok=True)
        copied.append(name)
    return copied


def _may_replace(copy: Path, src: Path, config: Config) -> bool:
    """Whether ``src``'s files may replace ``copy``'s: never when ``src`` is not the run the
    sweep asks for (a changed sweep file: the planner refuses it, and ``out`` keeps what it
    holds), nor when the copy is finished and ``src`` holds fewer epochs, or as many unfinished
    (a stale folder put back in the runs root). A restart's few epochs replace an unfinished
    copy (the copy mirrors the run folder), an extension's more epochs a finished one."""
    try:
        check_same_experiment(src, config)
        if not folder_finished(copy):
            return True
        rows = [len(rundir.read_metrics(d / rundir.METRICS)) for d in (copy, src)]
    except (SweepError, rundir.RunFolderError):
        return False
    return rows[1] > rows[0] or (rows[1] == rows[0] and folder_finished(src))


def _usable_cores() -> int:
    """The cores this process may use (taskset, a container's), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_sweep(sweep: Sweep, extra: list[str] | None = None, parallel: int = 1,
              dry_run: bool = False, argv: list[str] | None = None,
              log: Any = print, teacher_loader: TeacherLoader | None = None) -> list[PlannedRun]:
    """Train every unfinished run of a sweep; return the plan (with states before running).

    ``parallel`` > 1 trains that many runs at once as ``python -m bitvit train`` subprocesses
    (several runs on one GPU); each writes its output to RUN/train.log. With a runs root the
    small files are copied into ``out`` before, while (every few minutes) and after training.
    ``teacher_loader``: how runs in this process read a distillation teacher (`bitvit.train`'s;
    ``bitvit sweep`` passes `bitvit.load_teacher`, which reads exported models too).
    More processes than CPU cores are refused: each run needs a core, and every one more only
    takes memory.
    """
    cores = _usable_cores()
    if parallel > cores:
        raise SweepError(f"--parallel {parallel}: more than the {cores} CPU cores this process "
                         "may use (each run needs one)")
    if not dry_run:
        sync_results(sweep, extra)
    try:
        return _run_sweep(sweep, extra, parallel, dry_run, argv, log, teacher_loader)
    finally:
        if not dry_run:
            sync_results(sweep, extra)


def _run_sweep(sweep: Sweep, extra: list[str] | None, parallel: int, dry_run: bool,
               argv: list[str] | None, log: Any,
               teacher_loader: TeacherLoader | None = None) -> list[PlannedRun]:
    plan = plan_sweep(sweep, extra)
    todo = [r for r in plan if r.state not in ("finished", "running")]
    for r in plan:
        log(f"{r.state:9s} {r.run_dir}")
    log(f"{len(plan)} runs: {len(plan) - len(todo)} finished or running, {len(todo)} to train")
    _say_missing_teachers(todo, log)
    _say_other_setup(sweep, plan, todo, log)
    if dry_run or not todo:
        return plan
    _record_sweep(sweep, argv)
    if parallel <= 1:
        from bitvit.data import DataError
        from bitvit.training.checkpoint import CheckpointError
        from bitvit.training.config import ConfigError
        from bitvit.training.loop import TrainingError
        from bitvit.training.memory import MemoryLimitError
        from bitvit.training.rundir import RunFolderError

        failed = []
        for r in todo:
            try:
                _train_in_process(r, sweep, log, extra, teacher_loader)
            # A diverged run, a checkpoint that fails its checksums with no intact previous
            # copy, a garbage metrics.csv, no memory, a missing teacher or data: go on with the
            # others (as --parallel does), say so at the end.
            except (TrainingError, CheckpointError, MemoryLimitError, RunFolderError,
                    ConfigError, DataError) as e:
                log(f"FAILED    {r.run_dir}: {e}")
                failed.append(r.name)
            sync_results(sweep, extra)
        if failed:
            raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    else:
        _train_in_subprocesses(todo, sweep, parallel, log, extra)
    return plan


def _say_missing_teachers(todo: list[PlannedRun], log: Any) -> None:
    """Name each distillation teacher that is not there (weights live outside the repository,
    so a fresh machine has none): the runs that need it would each fail at their start."""
    needed: dict[str, int] = {}
    for r in todo:
        teacher = r.config.train.distill.teacher
        if teacher and not Path(teacher).exists():
            needed[teacher] = needed.get(teacher, 0) + 1
    for teacher, n in needed.items():
        log(f"MISSING   teacher {teacher}: the {n} run(s) distilled from it fail until it exists "
            "(train or copy it first)")


def _say_other_setup(sweep: Sweep, plan: list[PlannedRun], todo: list[PlannedRun],
                     log: Any) -> None:
    """Name each torch other than this one, and each CPU other than this one (run.json ``cpu``,
    where recorded), that the sweep's earlier runs were trained under (their run folders, and
    their copies in ``out``): the same config trains to other numbers under another torch or
    on another CPU, so what trains now will neither reproduce those runs nor resume them
    exactly (install that torch, or use that kind of machine, to keep one)."""
    import torch

    from bitvit.training.record import cpu_name

    if not todo:
        return
    here = {"torch": torch.__version__, "cpu": cpu_name(torch.device("cpu"))}
    words = {"torch": ("TORCH", "under torch"), "cpu": ("CPU", "on")}
    for key, this in here.items():
        others: dict[str, int] = {}
        for r in plan:
            for value in {rundir.read_info(d).get(key) for d in (r.run_dir, sweep.out / r.name)}:
                if isinstance(value, str) and value != this:
                    others[value] = others.get(value, 0) + 1
        tag, how = words[key]
        for value, n in sorted(others.items()):
            log(f"{tag:9s} {n} run(s) of this sweep were trained {how} {value}, this is "
                f"{this}: runs trained now will not reproduce theirs")


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


def _train_in_process(r: PlannedRun, sweep: Sweep, log: Any, extra: list[str] | None = None,
                      teacher_loader: TeacherLoader | None = None) -> None:
    from bitvit.training.loop import config_for_resume, train

    with contextlib.ExitStack() as stack:
        if _lock(r, stack, log) is None or not _claim(r, sweep, extra, log):
            return
        if r.state == "resume":
            # What `bitvit train --resume` does: the run's own config.yaml, with what r.command
            # may change (train_command refuses a resume it cannot express).
            config = config_for_resume(r.run_dir, r.config.train.epochs)
            config.data.path = r.config.data.path
            config.train.distill.teacher = r.config.train.distill.teacher
            train(config, resume=r.run_dir, quiet=True, command=r.command,
                  teacher_loader=teacher_loader)
        else:
            train(r.config, out=r.run_dir, quiet=True, command=r.command,
                  teacher_loader=teacher_loader)


SYNC_SECONDS = 300.0


# How long a child stopped with SIGTERM gets to mark its run interrupted before it is told
# again (Python drops a KeyboardInterrupt raised inside some callbacks), then killed.
STOP_SECONDS = 60


def _stop(proc: subprocess.Popen) -> None:
    for again in (None, proc.terminate, proc.kill):
        if again is not None:
            again()
        try:
            proc.wait(timeout=STOP_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _python_bitvit() -> list[str]:
    """How a subprocess calls the command line (this interpreter, this package)."""
    return [sys.executable, "-m", "bitvit"]


def _train_in_subprocesses(todo: list[PlannedRun], sweep: Sweep, parallel: int,
                           log: Any, extra: list[str] | None = None) -> None:
    queue = list(todo)
    running: list[tuple[PlannedRun, subprocess.Popen, contextlib.ExitStack]] = []
    failed = []
    synced = time.monotonic()
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # else each child takes every core: parallel x cores
        cores = _usable_cores()
        env["OMP_NUM_THREADS"] = str(max(1, cores // parallel))
        log(f"threads   OMP_NUM_THREADS={env['OMP_NUM_THREADS']} for each of {parallel} runs "
            f"on {cores} cores (set it to choose; run.json records each run's threads)")
    try:
        while queue or running:
            if time.monotonic() - synced > SYNC_SECONDS:  # results/ follows long runs
                sync_results(sweep, extra)
                synced = time.monotonic()
            while queue and len(running) < parallel:
                r = queue.pop(0)
                stack = contextlib.ExitStack()
                fd = _lock(r, stack, log)
                if fd is None or not _claim(r, sweep, extra, log):
                    stack.close()
                    continue
                logfile = stack.enter_context((r.run_dir / rundir.TRAIN_LOG).open("a"))
                cmd = [*_python_bitvit(), *r.command[1:]]
                # The child trains under the lock this process holds: it inherits it.
                # Its own session: a Ctrl-C reaches this process alone, which stops each child
                # once (a second interrupt could land while the child marks its run).
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                        pass_fds=(fd,), start_new_session=True,
                                        env={**env, rundir.LOCK_FD_ENV: str(fd)})
                running.append((r, proc, stack))
            time.sleep(0.5)
            for item in list(running):
                r, proc, stack = item
                if proc.poll() is not None:
                    running.remove(item)
                    stack.close()
                    sync_results(sweep, extra)
                    if proc.returncode != 0:
                        failed.append(r.name)
                    log(f"{'done' if proc.returncode == 0 else 'FAILED':9s} {r.run_dir}"
                        + ("" if proc.returncode == 0 else f" (see {r.run_dir}/train.log)"))
    finally:
        # Interrupted: let each child mark its run interrupted. The children have sessions of
        # their own, so a second Ctrl-C must not end this process before they are stopped.
        main = threading.current_thread() is threading.main_thread()  # where signals are set
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if running and main else None
        try:
            for _, proc, _ in running:
                proc.terminate()
            for _, proc, stack in running:
                _stop(proc)
                stack.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
