"""Comparison and report: reading run folders, grouping them, the statistics against full
precision, the Markdown tables and ``results/README.md``.

`load_run` reads run folders (metrics.csv, config.yaml, run.json); `group_runs` groups runs
whose configs are equal except for the seed and settings that do not change the experiment
(device, data location, compile, eval batch size); `compare_groups` computes per-group
mean +- std over seeds (test accuracy and loss over the last k epochs and at the final one,
train accuracy and the train-test gap from the eval-mode ``train_eval_acc`` where runs have it)
and, for each quantized group, the difference to its full-precision group: a 95% confidence
interval (Welch-Satterthwaite), Welch's t-test p-value and a TOST equivalence test at a stated
margin, each Holm-adjusted over the table (two families), beside the margin the seeds can
resolve (`bitvit.stats`).
`compare_markdown` and `plot_groups` (`bitvit.figures`) turn that into tables (with
`turning_markdown`: where each test loss is lowest and whether it rises after) and the first
study's figure; `write_report` regenerates ``results/README.md``, with `bitvit.tuning`'s section
(each method at its own learning rate) for sweeps over ``train.lr`` with a validation split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bitvit import rundir
from bitvit.figures import devices, plot_dots, plot_groups
from bitvit.methods import FULL_PRECISION
from bitvit.stats import (
    Difference,
    Summary,
    adjust_holm,
    holm,
    last_k_mean,
    rise_p_value,
    summarize,
    turning_point,
    welch_difference,
)
from bitvit.sweep import (
    COMMANDS_FILE,
    SWEEP_COPY,
    Sweep,
    SweepError,
    experiment_key,
    format_value,
    load_sweep,
)

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
    return Run(path, config, rundir.read_info(path), rows)


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
    return f"{key.split('.')[1]}={format_value(value)}"


def group_labels(keys: list[dict[str, Any]]) -> list[str]:
    """A label per experiment key naming what differs between them (e.g. ``b158 all act8``)."""
    all_keys = sorted({k for key in keys for k in key})
    # A key names groups when it takes more than one value among the groups that have it (full
    # precision has no quant.where, and needs none in its label).
    differing = [k for k in all_keys if len({json.dumps(key[k], default=str)
                                              for key in keys if k in key}) > 1]
    order = ["quant.method", "quant.where", "quant.act_bits"]
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
# The tables
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


def _amount(x: float, metric: str) -> str:
    """A margin in the metric's units: accuracy points, or loss."""
    return f"{100 * x:.2f} pts" if "acc" in metric or metric == "gap" else f"{x:.4f}"


def verdict_text(d: Difference, metric: str) -> str:
    """The verdict; an inconclusive one says why: a test (Welch or TOST) passed only before
    Holm, a margin finer than the seeds can resolve, or a 90% CI that reaches past the margin."""
    if d.verdict != "inconclusive":
        return d.verdict if d.available else f"n/a: {d.reason}"
    why = []
    if d.p_value < d.alpha:
        why.append(f"Welch p < {d.alpha:g} only before Holm")
    margin = _amount(d.margin, metric)
    if d.tost_p < d.alpha:  # the 90% CI lies within the margin, but not after the correction
        why.append(f"TOST p < {d.alpha:g} only before Holm")
    elif d.resolvable >= d.margin:
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


def turning_markdown(groups: list[Group], k: int) -> list[str]:
    """The test-loss turning point per group (does the loss rise partway, and when), from the
    finished runs: epoch and value of the lowest test loss, the rise after it, how many runs
    rise beyond their noise, and a one-sided t-test of the rise across seeds, Holm over groups."""
    points = [[turning_point([row["test_loss"] for row in r.rows], k)
               for r in g.runs if r.finished and r.rows] for g in groups]
    rises = [[t.rise for t in ts if not math.isnan(t.rise)] for ts in points]
    p = [rise_p_value(r) for r in rises]
    tests = sum(not math.isnan(x) for x in p)
    lines = ["", f"Test-loss turning point (finished runs): a run counts as rising when its "
             f"lowest test loss comes before its last {k} epochs and the mean of those {k} "
             f"epochs exceeds that lowest loss by more than the run's epoch-to-epoch noise, the "
             f"standard deviation (ddof 1) of the successive differences of its test loss "
             f"within those {k} epochs; runs of fewer than {k + 2} epochs are too short to "
             f"tell (n/a). Rise: the mean of the last {k} epochs minus the lowest test loss "
             f"before them (negative while the loss still falls). p: one-sided one-sample "
             f"t-test across seeds that the rise is > 0, "
             + (f"raw and Holm-adjusted over the {tests} tests of this table." if tests else
                "possible with 2 or more finished runs per group (none yet)."), "",
             f"| group | runs | epoch of lowest test loss | lowest test loss | rise (last {k} − "
             f"lowest before) | runs rising | p (rise > 0) | Holm p |", "|---" * 8 + "|"]
    for g, ts, r, raw, adj in zip(groups, points, rises, p, holm(p), strict=True):
        e = summarize([t.epoch for t in ts])
        epoch = ("n/a" if e.n == 0 else f"{e.mean:.0f} (1 seed)" if e.n == 1
                 else f"{e.mean:.1f} ± {e.std:.1f}")
        told = [t.rises for t in ts if t.rises is not None]
        # Undecided: too short, or (k < 3, a non-finite loss) no noise to compare with.
        why = "too short" if all(math.isnan(t.rise) for t in ts if t.rises is None) else "undecided"
        count = f"{sum(told)} of {len(told)}" if told else "n/a"
        if len(told) < len(ts):
            count += f" ({len(ts) - len(told)} {why})" if told else f" ({why})"
        tested = "n/a | n/a" if math.isnan(raw) else f"{raw:.3g} | {adj:.3g}"
        lines.append(f"| {g.label} | {len(ts)} | {epoch} | "
                     f"{_mean_std(summarize([t.lowest for t in ts]), 'test_loss')} | "
                     f"{_mean_std(summarize(r), 'test_loss')} | {count} | {tested} |")
    return lines


def compare_markdown(groups: list[Group], runs: list[Run], full_epochs: int | None = None,
                     figure: str | None = None, last_k: int = DEFAULT_LAST_K,
                     dots: str | None = None) -> str:
    """The comparison as Markdown: provenance, per-group table, differences to fp, the test-loss
    turning point, unfinished runs, and the links to the curves (``figure``) and the per-seed
    dot plot (``dots``)."""
    lines = provenance_lines(runs, full_epochs)
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
        if not tests:  # no group has two finished seeds on both sides: nothing can be tested
            lines += ["", "Differences to full precision: no test is possible yet (each side "
                      "needs at least two finished seeds); the differences of the means are "
                      "shown without p-values.", ""]
        else:
            lines += ["", f"Differences to full precision (group − fp, matched in everything "
                      f"but quantization): 95% confidence interval (Welch–Satterthwaite); "
                      f"Welch t-test p-value, raw and Holm-adjusted over the {tests} tests of "
                      f"this table (differs: Holm p < 0.05); TOST equivalence p-value at a "
                      f"margin of ±{acc_m:g} accuracy points and ±{loss_m:g} loss, raw and "
                      f"Holm-adjusted over the {tests} TOST tests of this table, a family of "
                      f"their own (equivalent: TOST Holm p < 0.05). Resolvable margin: the "
                      f"half-width of the 90% confidence interval (Welch), the smallest margin "
                      f"TOST can confirm with these seeds even for a difference of zero.", ""]
        lines.append("| group | metric | difference [95% CI] | Welch p | Holm p | TOST p "
                     "| TOST Holm p | resolvable margin | verdict |")
        lines.append("|---" * 9 + "|")
        for g in compared:
            for m, d in g.vs_fp.items():
                if d.available:
                    diff = (f"{_signed(d.diff, m)} [{_signed(d.ci_low, m)}, "
                            f"{_signed(d.ci_high, m)}]")
                    lines.append(f"| {g.label} | {labels[m]} | {diff} | {d.p_value:.3g} | "
                                 f"{d.p_adjusted:.3g} | {d.tost_p:.3g} | "
                                 f"{d.tost_adjusted:.3g} | {_amount(d.resolvable, m)} | "
                                 f"{verdict_text(d, m)} |")
                else:
                    lines.append(f"| {g.label} | {labels[m]} | {_signed(d.diff, m)} | n/a | n/a "
                                 f"| n/a | n/a | n/a | {verdict_text(d, m)} |")
    lines += turning_markdown(groups, last_k)
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
    if dots:
        lines += ["", f"![every seed's test accuracy, last {last_k} epochs, per group]({dots})"]
    elif figure:  # compare draws the dots whenever a run is in the statistics
        lines += ["", "No dot plot of every seed's test accuracy yet: it ranks finished runs, "
                  "and none has finished."]
    return "\n".join(lines) + "\n"


def compare(paths: list[str | Path], out: str | Path | None = None, margin: float = 0.01,
            loss_margin: float = 0.05, include_unfinished: bool = False,
            full_epochs: int | None = None, title: str = "",
            last_k: int = DEFAULT_LAST_K) -> tuple[list[Group], str]:
    """Load, group and compare run folders; with ``out``, write compare.md, compare.png and
    (once a run is in the statistics) compare-dots.png.
    ``last_k``: the window of the last-k means (test accuracy and loss, train accuracy, gap)."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    groups = compare_groups(group_runs(runs, include_unfinished), margin, loss_margin,
                            last_k=last_k)
    figure = dots = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_groups(groups, out / "compare.png", title, full_epochs)
        figure = "compare.png"
        if plot_dots(groups, out / "compare-dots.png", title, full_epochs, last_k):
            dots = "compare-dots.png"
        else:  # no run in the statistics yet: no ranking, and none left over from before
            (out / "compare-dots.png").unlink(missing_ok=True)
    text = compare_markdown(groups, runs, full_epochs, figure, last_k, dots)
    if out is not None:
        rundir.write_text(out / "compare.md", text)
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
            from bitvit.tuning import rates_section  # it builds on this module

            section = rates_section(sweep, [out / n for n in planned if n in present], rel,
                                    margin, last_k)
            lines += [section.rstrip(), ""] if section else []
            _, text = compare([out / n for n in planned if n in present], out=out, margin=margin,
                              loss_margin=loss_margin, full_epochs=sweep.full_epochs,
                              title=sweep.title, last_k=last_k)
            for image in ("compare.png", "compare-dots.png"):
                text = text.replace(f"]({image})", f"]({rel}/{image})")
            lines += [text.rstrip(), ""]
        if missing and not present:  # a list of every grid point would drown the page
            lines += [f"Not run: all {len(planned)} planned runs (`bitvit sweep {sweep.path} "
                      "--dry-run` lists them).", ""]
        elif missing:
            lines += [f"Not run ({len(missing)} of {len(planned)}): "
                      + ", ".join(f"`{n}`" for n in missing) + ".", ""]
    path = results / "README.md"
    rundir.write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
