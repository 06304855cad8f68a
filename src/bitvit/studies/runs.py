"""Run folders as the studies read them: `Run` (config, run.json, metrics), `Group` (runs that
differ only by seed), the metrics a table reports, and the provenance lines (device, budget,
data size) that travel with every table and figure.

The data model the report, the figures and the learning-rate tables share, below all three.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitvit.nn.methods import FULL_PRECISION
from bitvit.studies.stats import Difference, Summary, last_k_mean
from bitvit.studies.sweep import SweepError, experiment_key, format_value
from bitvit.training import rundir
from bitvit.training.config import Config, ConfigError, read_yaml_mapping

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
    def epoch_seconds(self) -> float:
        """The time its epochs took, training and evaluation (metrics.csv's ``seconds``): what
        every kept epoch measured, whichever invocation ran it. run.json's wall times miss an
        invocation that was killed (it never wrote its own), and count set-up and redone work."""
        seconds = [row.get("seconds", math.nan) for row in self.rows]
        # Plain sum: finite values too large to add give inf (n/a), where math.fsum would raise.
        return float(sum(seconds)) if all(math.isfinite(x) for x in seconds) else math.nan

    @property
    def seed(self) -> Any:
        return self.config.get("train", {}).get("seed")

    def final(self, metric: str) -> float:
        return self.rows[-1][metric]


def load_run(path: str | Path) -> Run:
    """The run folder ``path``: its config.yaml checked as any config is (types and ranges),
    metrics.csv with the columns the studies read, run.json with each field of the wrong type
    treated as missing. A bad file is a one-line SweepError naming it."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise SweepError(f"{path}: not a run folder (no config.yaml)")
    config = read_yaml_mapping(config_path, "run config", "sections model, quant, data, train",
                               SweepError)
    config = _checked_config(config_path, config)
    try:
        rows = rundir.read_metrics(path / "metrics.csv")
    except rundir.RunFolderError as e:  # already one line naming the file and the row
        raise SweepError(str(e)) from None
    _check_columns(path / rundir.METRICS, rows)
    return Run(path, config, _typed_info(rundir.read_info(path)), rows)


def _checked_config(path: Path, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``raw`` (config.yaml as written) after the checks any config gets (`Config.from_dict`):
    an edited ``train.epochs: abc`` or a section that is not a mapping fails here, as one line,
    and not later as a traceback. The raw mapping is kept, so that the experiment keys of older
    run folders stay as they were; an empty section (``train:``) reads as {}."""
    try:
        Config.from_dict(raw, str(path))
    except ConfigError as e:  # names the file and the key
        raise SweepError(str(e)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # defensive: one line
        raise SweepError(f"{path}: not a valid run config ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    return {section: values if values is not None else {} for section, values in raw.items()}


def _check_columns(path: Path, rows: list[dict[str, float]]) -> None:
    """The columns every table and figure reads: train loss, test accuracy and loss, and a
    train accuracy (eval mode or running); a one-line SweepError naming the file and the columns
    otherwise."""
    if not rows:
        return
    missing = [c for c in ("train_loss", "test_acc", "test_loss") if c not in rows[0]]
    if "train_acc" not in rows[0] and "train_eval_acc" not in rows[0]:
        missing.append("train_acc (or train_eval_acc)")
    if missing:
        raise SweepError(f"{path}: no {_and(missing)} column{'s' * (len(missing) > 1)}; "
                         f"expected the columns bitvit train writes "
                         f"({', '.join(rundir.METRIC_COLUMNS)}, ...)")


def _typed_info(info: dict[str, Any]) -> dict[str, Any]:
    """run.json as the studies read it: a status or device of the wrong type is treated as
    missing, as `rundir.read_info` treats an unreadable file (run.json is a record, not an
    input: an edited one must not stop a comparison). Its wall times are not read: the tables'
    time is metrics.csv's (`Run.epoch_seconds`)."""
    return {k: v for k, v in info.items() if k not in ("status", "device") or isinstance(v, str)}


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
    best/ checkpoint); without a validation split, the highest test accuracy (optimistic); nan
    where a value it looks at is not finite."""
    picked = [row["val_acc"] for row in run.rows] if has_val(run) else []
    tests = [row["test_acc"] for row in run.rows]
    if not all(math.isfinite(v) for v in picked + tests):  # max() of a nan depends on its place
        return math.nan
    if has_val(run):
        return max(run.rows, key=lambda row: row["val_acc"])["test_acc"]
    return max(tests)


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
    "epoch_seconds": lambda r, k: r.epoch_seconds,
}
# The metrics tested against full precision, each a question of its own (one Holm family per
# metric, over a table's groups); accuracies use the accuracy margin, losses the loss margin.
TESTED = ["last_test_acc", "final_test_acc", "last_test_loss", "final_test_loss", "train_acc",
          "gap"]
# The metrics made of the train accuracy: tested only where every run on both sides recorded
# the eval-mode one (`train_acc_kinds`), so that no test mixes it with the running train-mode
# accuracy, nor compares two running ones (dropout on, weights changing within the epoch).
TRAIN_METRICS = ("train_acc", "gap")


def train_acc_kinds(runs: list[Run]) -> set[str]:
    """Which train accuracies the runs give (`train_acc_column`): ``train_eval_acc``,
    ``train_acc`` or both; empty without a run with metrics."""
    return {train_acc_column(r) for r in runs if r.rows}


def metric_labels(runs: list[Run], k: int) -> dict[str, str]:
    """Column names for a table of these runs; they say which train accuracy and which "best"
    the runs give (a table of old and new run folders says both)."""
    kinds = train_acc_kinds(runs)
    train = ("eval mode" if kinds == {"train_eval_acc"} else "running, train mode"
             if kinds <= {"train_acc"} else "eval mode or running")
    vals = {has_val(r) for r in runs if r.rows}
    best = ("test acc at best val" if vals == {True} else "best test acc (optimistic)"
            if vals <= {False} else "test acc at best val, or best (optimistic)")
    return {"last_test_acc": f"test acc, last {k}", "final_test_acc": "test acc, final",
            "best_test_acc": best, "last_test_loss": f"test loss, last {k}",
            "final_test_loss": "test loss, final", "train_acc": f"train acc ({train}), last {k}",
            "gap": f"train-test gap, last {k}", "epochs": "epochs",
            "epoch_seconds": "time of its epochs"}


@dataclass
class Group:
    label: str
    key: dict[str, Any]  # experiment_key of its runs
    runs: list[Run]  # used in the statistics
    unfinished: list[Run] = field(default_factory=list)  # left out (or included, marked)
    stats: dict[str, Summary] = field(default_factory=dict)
    vs_fp: dict[str, Difference] = field(default_factory=dict)
    reference: str | None = None  # label of the full-precision group it is compared with
    # (epoch of fp's lowest mean test loss, this group's test loss there - fp's), and each
    # run's own lowest test loss - fp's; see bitvit.studies.report.loss_at_fp_lowest
    fp_lowest: tuple[int, Difference] | None = None
    own_lowest: Difference | None = None

    @property
    def is_fp(self) -> bool:
        return self.key.get("quant.method") == FULL_PRECISION

    def values(self, metric: str, last_k: int = DEFAULT_LAST_K) -> list[float]:
        return [METRICS[metric](r, last_k) for r in self.runs if r.rows]


# Distillation settings in labels: ``kd=soft``, ``alpha=0.5``, ``T=4``, ``teacher=1a2b3c4d``.
DISTILL_LABELS = {"train.distill.kind": "kd", "train.distill.temperature": "T",
                  "train.distill.teacher_sha256": "teacher"}


def _label_part(key: str, value: Any) -> str:
    if key == "quant.method":
        return str(value)
    if key == "quant.where":
        return str(value)
    if key == "quant.act_bits":
        return "act-fp" if value is None else f"act{value}"
    if key == "train.distill.teacher_sha256":
        return f"teacher={str(value)[:8]}"
    name = DISTILL_LABELS.get(key, key.split(".")[-1])
    return f"{name}={format_value(value)}"


def group_labels(keys: list[dict[str, Any]]) -> list[str]:
    """A label per experiment key naming what differs between them (e.g. ``b158 all act8``,
    ``b158 all act8 kd=soft``)."""
    all_keys = sorted({k for key in keys for k in key})
    # A key names groups when it takes more than one value among the groups that have it (full
    # precision has no quant.where, and needs none in its label); the kind of distillation also
    # when only some groups have a teacher (the others have no train.distill keys at all).
    differing = [k for k in all_keys if len({json.dumps(key[k], default=str)
                                              for key in keys if k in key}) > 1
                 or k == "train.distill.kind" and not all(k in key for key in keys)]
    order = ["quant.method", "quant.where", "quant.act_bits", "train.distill.kind"]
    differing.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    if "quant.method" not in differing and any(k.startswith("quant.") for k in differing):
        differing.insert(0, "quant.method")
    return [" ".join(_label_part(k, key[k]) for k in differing if k in key)
            or str(key.get("quant.method", "runs")) for key in keys]


def group_runs(runs: list[Run], include_unfinished: bool = False) -> list[Group]:
    """Group runs that differ only by seed (and settings in `IGNORED_KEYS`).

    Labels name what differs between groups (e.g. ``b158 all act8``); unfinished runs are kept
    apart in ``unfinished`` and, with ``include_unfinished``, also counted at their last epoch.
    """
    keyed: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for r in runs:
        key = experiment_key(r.config)
        keyed.setdefault(json.dumps(key, sort_keys=True, default=str), (key, []))[1].append(r)
    labels = group_labels([k for k, _ in keyed.values()])
    groups = []
    for label, (key, members) in zip(labels, keyed.values(), strict=True):
        _check_seeds_differ(label, members)
        done = [r for r in members if r.finished]
        unfinished = [r for r in members if not r.finished]
        used = done + (unfinished if include_unfinished else [])
        groups.append(Group(label, key, sorted(used, key=_seed_order),
                            sorted(unfinished, key=_seed_order)))
    groups.sort(key=lambda g: (not g.is_fp, g.label))
    return groups


def _seed_order(run: Run) -> tuple[bool, Any]:
    return (not isinstance(run.seed, int), run.seed if isinstance(run.seed, int) else str(run.seed))


def _check_seeds_differ(label: str, members: list[Run]) -> None:
    """A group's runs are its seeds' replicates: one run twice (a copy in another folder) would
    count as two and narrow every interval."""
    seen: dict[Any, Run] = {}
    for r in members:
        key = json.dumps(r.seed, default=str)
        if key in seen:
            raise SweepError(f"{seen[key].path} and {r.path}: both are seed {r.seed} of group "
                             f"{label!r}; a group's runs must be different seeds (pass one)")
        seen[key] = r


def devices(runs: list[Run]) -> list[str]:
    """The devices the runs trained on (run.json ``device``, with its ``cpu`` where recorded:
    fp32 rounds otherwise on another CPU), each once."""
    return sorted({str(r.info.get("device", "unknown device"))
                   + (f" on {r.info['cpu']}" if r.info.get("cpu") else "") for r in runs})


def provenance(runs: list[Run], full_epochs: int | None = None,
               unfinished: list[Run] | None = None) -> str:
    """Where and how long the finished ``runs`` trained, e.g. ``device: cpu (...); 15 of 100
    epochs``; the figure carries it so that it never travels without its device and budget.
    The device is also taken from ``unfinished`` runs (drawn too); without finished runs the
    budget reads ``no finished run yet`` (`unfinished_line` says how far the others are)."""
    configured = ", ".join(map(str, sorted({r.epochs_configured for r in runs})))
    budget = (("no finished run yet" if unfinished else "no runs") if not configured
              else f"{configured} of {full_epochs} epochs" if full_epochs
              else f"{configured} epochs")
    return f"device: {'; '.join(devices([*runs, *(unfinished or [])])) or 'none'}; {budget}"


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 2 else items)


def epochs_done(runs: list[Run]) -> str:
    """How far unfinished runs are, e.g. ``4 and 5 of 100 epochs`` (``4 of 50 and 7 of 100
    epochs`` for different budgets)."""
    by_budget: dict[int, list[int]] = {}
    for r in sorted(runs, key=lambda r: len(r.rows)):
        by_budget.setdefault(r.epochs_configured, []).append(len(r.rows))
    return _and([f"{_and([str(d) for d in done])} of {budget}"
                 for budget, done in sorted(by_budget.items())]) + " epochs"


def unfinished_line(unfinished: list[Run], full_epochs: int | None = None) -> str:
    """The title line of unfinished runs, e.g. ``2 runs unfinished: 4 and 5 of 100 epochs;
    drawn thin, a dot per epoch``; empty without any."""
    if not unfinished:
        return ""
    budgets = {r.epochs_configured for r in unfinished}
    short = (f" (a shortened budget of {full_epochs})"
             if full_epochs and any(b < full_epochs for b in budgets) else "")
    runs = "1 run" if len(unfinished) == 1 else f"{len(unfinished)} runs"
    drawn = "; drawn thin, a dot per epoch" if any(r.rows for r in unfinished) else ""
    return f"{runs} unfinished: {epochs_done(unfinished)}{short}{drawn}"


def _images(limit: Any, held_out: int = 0, split: str = "training") -> str:
    if limit is None:
        # The config does not record the full split's size, so it is not printed.
        return (f"full {split} set less {held_out:,} for validation" if held_out
                else f"full {split} set")
    if held_out:
        return (f"{int(limit) - held_out:,} (class-balanced subset of {int(limit):,}, "
                f"{held_out:,} held out for validation)")
    return f"{int(limit):,} (class-balanced subset)"


def data_size(runs: list[Run]) -> str:
    """How many images the runs trained and were tested on (config.yaml ``data.limit_train``,
    ``data.val_size``, ``data.limit_test``), e.g. ``training images: 10,000 (class-balanced
    subset); test images: full test set``."""
    if not runs:
        return ""
    data = [r.config.get("data", {}) for r in runs]
    train = sorted({_images(d.get("limit_train"), int(d.get("val_size") or 0)) for d in data})
    test = sorted({_images(d.get("limit_test"), split="test") for d in data})
    return f"training images: {'; '.join(train)}; test images: {'; '.join(test)}"


def provenance_lines(runs: list[Run], full_epochs: int | None = None) -> list[str]:
    """Where the runs trained, for how many of the full epochs, on how many images."""
    lines = []
    configured = sorted({r.epochs_configured for r in runs})
    lines.append(f"Runs: {len(runs)} (device: {'; '.join(devices(runs))}).")
    budget = f"Epochs configured: {', '.join(map(str, configured))}"
    if full_epochs and any(e < full_epochs for e in configured):
        budget += (f" — shortened budget: {', '.join(map(str, configured))} of {full_epochs} "
                   "epochs; every number below comes from the shortened runs")
    lines.append(budget + ".")
    limits = sorted({str(r.config.get("data", {}).get("limit_train")) for r in runs})
    if limits != ["None"]:
        lines.append(f"Training images: class-balanced subset of {', '.join(limits)} "
                     "(data.limit_train).")
    held = sorted({int(r.config.get("data", {}).get("val_size") or 0) for r in runs})
    if held != [0]:
        lines.append(f"Validation split: {', '.join(map(str, held))} of those images held out "
                     "(data.val_size); the rest train.")
    return lines
