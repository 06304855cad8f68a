"""Comparison and report: the statistics against full precision, the Markdown tables and
``results/README.md``, from the runs and groups of `bitvit.studies.runs`.

`bitvit.studies.runs.load_run` reads run folders (metrics.csv, config.yaml, run.json);
`group_runs` groups runs whose configs are equal except for the seed and settings that do not
change the experiment (device, data location, compile, eval batch size); `compare_groups`
computes per-group mean +- std over seeds (test accuracy and loss over the last k epochs and at
the final one, train accuracy and the train-test gap from the eval-mode ``train_eval_acc`` where
runs have it) and, for each quantized group, the difference to its full-precision group: a 95%
confidence interval (Welch-Satterthwaite), Welch's t-test p-value and a TOST equivalence test at
a stated margin, beside the margin the seeds can resolve (`bitvit.studies.stats`). Each metric
is a question of its own: its Welch p-values are Holm-adjusted over that metric's tests across
the table's groups (one family per metric), its TOST p-values likewise (another family). Train
accuracy and the gap are tested only where every run on both sides has the eval-mode train
accuracy. Sweeps whose groups differ only in ``quant.where`` get the placements table too
(`bitvit.studies.placement`, its own family); sweeps with distilled students get their
tables against the twin without a teacher and against the teacher
(`bitvit.studies.distillation`, families of their own). `compare_markdown` and `plot_groups`
(`bitvit.studies.figures`) turn that into tables (with `loss_at_fp_lowest`: each group's test
loss at the epoch of fp's lowest, and `turning_markdown`: where each test loss is lowest and
whether it rises after) and the first study's figure; `write_report` regenerates
``results/README.md``, with `bitvit.studies.tuning`'s section (each method at its own learning
rate) for sweeps over ``train.lr`` with a validation split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bitvit import files
from bitvit.studies.distillation import (
    SettingPair,
    Student,
    compare_settings,
    compare_students,
    distillation_markdown,
)
from bitvit.studies.figures import plot_dots, plot_groups
from bitvit.studies.placement import PlacementPair, compare_placements, placements_markdown
from bitvit.studies.runs import (
    DEFAULT_LAST_K,
    METRICS,
    TESTED,
    TRAIN_METRICS,
    Group,
    Run,
    find_run_dirs,
    group_runs,
    has_val,
    load_run,
    metric_labels,
    provenance_lines,
    train_acc_kinds,
)
from bitvit.studies.stats import (
    REFERENCE_EPOCHS,
    Difference,
    adjust_holm,
    finite_mean,
    holm,
    positive_p_value,
    summarize,
    turning_points,
    welch_difference,
)
from bitvit.studies.sweep import (
    COMMANDS_FILE,
    SWEEP_COPY,
    Sweep,
    SweepError,
    load_sweep,
)
from bitvit.studies.tables import (
    DIFFERENCE_HEADER,
    difference_cells,
    mean_std,
)

# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def _without_quant(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if not k.startswith("quant.")}


OLDER_RUNS = "older runs record only train-mode accuracy"


def _train_acc_reason(group: Group, ref: Group) -> str:
    """Why train accuracy and the gap of ``group`` against ``ref`` are not tested: unless every
    run on both sides has the eval-mode train accuracy, a test would compare running train-mode
    accuracies, or mix them with eval-mode ones; empty when it can be tested."""
    kinds = {g.label: train_acc_kinds(g.runs) for g in (group, ref)}
    if any(not k for k in kinds.values()) or all(k == {"train_eval_acc"}
                                                 for k in kinds.values()):
        return ""  # no runs (welch_difference says so), or eval mode throughout
    if all(k == {"train_acc"} for k in kinds.values()):
        return f"{OLDER_RUNS} (running, dropout on); not tested"
    older = [label for label, k in kinds.items() if "train_acc" in k]
    return f"{OLDER_RUNS} ({' and '.join(older)}); not compared with eval-mode accuracy"


def _untested(group: Group, ref: Group, metric: str, margin: float, alpha: float,
              reason: str, last_k: int) -> Difference:
    """A difference left out of the tests; the difference of the means only where both sides
    give one and the same kind of train accuracy (both running)."""
    a, b = group.values(metric, last_k), ref.values(metric, last_k)
    one_kind = len(train_acc_kinds(group.runs) | train_acc_kinds(ref.runs)) == 1
    diff = finite_mean(a) - finite_mean(b) if a and b and one_kind else math.nan
    nan = math.nan
    return Difference(diff, nan, nan, nan, nan, margin, nan, alpha, reason=reason)


def compare_groups(groups: list[Group], margin: float = 0.01, loss_margin: float = 0.05,
                   alpha: float = 0.05, last_k: int = DEFAULT_LAST_K) -> list[Group]:
    """Fill each group's summaries and, for quantized groups, the differences to the
    full-precision group that matches it in everything but quantization. Each metric is one
    question: its Welch p-values are Holm-adjusted over that metric's tests across the groups
    (one family per metric), its TOST p-values likewise. Train accuracy and the gap are
    tested only where every run on both sides has the eval-mode train accuracy, and a group
    whose runs mix the two kinds gives no mean of them."""
    if last_k < 1:
        raise SweepError(f"--last-k {last_k}: expected 1 or more epochs")
    check_margins(margin, loss_margin)
    for g in groups:
        g.stats = {m: summarize(g.values(m, last_k)) for m in METRICS}
        if len(train_acc_kinds(g.runs)) > 1:  # eval-mode and running: no mean of the two
            g.stats |= {m: summarize([]) for m in TRAIN_METRICS}
    fps = [g for g in groups if g.is_fp]
    for g in groups:
        if g.is_fp:
            continue
        ref = next((f for f in fps if _without_quant(f.key) == _without_quant(g.key)), None)
        if ref is None:
            continue
        g.reference = ref.label
        for m in TESTED:
            m_margin = loss_margin if "loss" in m else margin
            why = _train_acc_reason(g, ref) if m in TRAIN_METRICS else ""
            g.vs_fp[m] = (_untested(g, ref, m, m_margin, alpha, why, last_k) if why else
                          welch_difference(g.values(m, last_k), ref.values(m, last_k), m_margin,
                                           alpha))
    for m in TESTED:  # one family per question
        adjust_holm([g.vs_fp[m] for g in groups if m in g.vs_fp])
    loss_at_fp_lowest(groups, loss_margin, alpha)
    return groups

# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


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
    kinds = train_acc_kinds(with_rows)
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
            "accuracy minus test accuracy, epoch by epoch, averaged over the same window.",
            "Time of its epochs: the sum of metrics.csv's per-epoch seconds (training and "
            "evaluation; not set-up, nor work a killed invocation lost), on the run's own device "
            "(run.json)."]


def _sentence(parts: list[str]) -> str:
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def turning_markdown(groups: list[Group], k: int) -> list[str]:
    """The test-loss turning point per group (does the loss rise partway, and when), from the
    finished runs: epoch and value of the lowest test loss, the rise after it (from the epoch
    the other seeds pick, `turning_points`), how many runs rise beyond their noise, and a
    one-sided t-test of the rise across seeds, Holm over groups."""
    # A run without a finite test loss (diverged, or edited) has no turning point: left out.
    losses = [_finished_losses(g) for g in groups]
    points = [turning_points(x, k) for x in losses]
    rises = [[t.rise for t in ts if math.isfinite(t.rise)] for ts in points]
    p = [positive_p_value(r) for r in rises]
    tests = sum(not math.isnan(x) for x in p)
    w = REFERENCE_EPOCHS
    lines = ["", f"Test-loss turning point (finished runs). Rise: the mean test loss of a run's "
             f"last {k} epochs minus its mean over the {w} epochs around the epoch where the "
             f"group's *other* runs' mean test loss is lowest (moved, if it overlaps them, to end "
             f"before those {k}; "
             f"picked on the other runs, so that the minimum of a run's own noise does not make "
             f"a flat curve rise; one run alone cannot tell, n/a). A run counts as rising when "
             f"that epoch comes before its last {k} and the rise exceeds the run's "
             f"epoch-to-epoch noise, the standard deviation (ddof 1) of the successive "
             f"differences of its test loss within those {k} epochs; runs of fewer than "
             f"{k + w} epochs are too short to tell. The lowest test loss and its epoch are each "
             f"run's own. p: one-sided one-sample t-test across seeds that the rise is > 0, "
             + (f"raw and Holm-adjusted over the {tests} tests of this table." if tests else
                "possible with 2 or more finished runs per group, each long enough to tell "
                "(none yet)."), "",
             f"| group | runs | epoch of lowest test loss | lowest test loss | rise (last {k} − "
             f"around the others' lowest) | runs rising | p (rise > 0) | Holm p |",
             "|---" * 8 + "|"]
    for g, x, ts, r, raw, adj in zip(groups, losses, points, rises, p, holm(p), strict=True):
        e = summarize([t.epoch for t in ts])
        epoch = ("n/a" if e.n == 0 else f"{e.mean:.0f} (1 seed)" if e.n == 1
                 else f"{e.mean:.1f} ± {e.std:.1f}")
        told = [t.rises for t in ts if t.rises is not None]
        # Undecided: one run, too short, or (k < 3, a non-finite loss) no noise to compare with.
        why = ("one run" if len(ts) == 1 else
               "too short" if all(len(run) < k + w for run, t in zip(x, ts, strict=True)
                                  if t.rises is None)
               else "undecided")
        count = f"{sum(told)} of {len(told)}" if told else "n/a"
        if len(told) < len(ts):
            count += f" ({len(ts) - len(told)} {why})" if told else f" ({why})"
        tested = "n/a | n/a" if math.isnan(raw) else f"{raw:.3g} | {adj:.3g}"
        lines.append(f"| {g.label} | {len(ts)} | {epoch} | "
                     f"{mean_std(summarize([t.lowest for t in ts]), 'test_loss')} | "
                     f"{mean_std(summarize(r), 'test_loss')} | {count} | {tested} |")
    return lines


def _finished_losses(g: Group) -> list[list[float]]:
    """The test losses of each finished run of ``g`` that has at least one finite one."""
    losses = [[row["test_loss"] for row in r.rows] for r in g.runs if r.finished]
    return [x for x in losses if any(math.isfinite(v) for v in x)]


def loss_at_fp_lowest(groups: list[Group], loss_margin: float = 0.05,
                      alpha: float = 0.05) -> None:
    """Fill each compared group's ``fp_lowest``: the epoch where its full-precision group's mean
    test loss (over finished seeds) is lowest, and the group's test loss there against fp's
    (group − fp); and its ``own_lowest``: each run's lowest test loss against fp's runs' lowest.
    Holm over the groups, one family for each of the two. The paper's "lower test loss" read at
    the best point rather than at the end, where an earlier turn upward would decide it."""
    import numpy as np

    for g in groups:
        ref = next((f for f in groups if f.label == g.reference), None)
        fp_runs = [r for r in ref.runs if r.finished] if ref else []
        if not fp_runs:
            continue
        g.own_lowest = welch_difference(_lowest_losses(g), _lowest_losses(ref), loss_margin,
                                        alpha)
        n = min(len(r.rows) for r in fp_runs)
        with np.errstate(all="ignore"):  # nan, inf or 1e308 losses: that epoch is no candidate
            curve = np.mean([[row["test_loss"] for row in r.rows[:n]] for r in fp_runs], axis=0)
        if not np.isfinite(curve).any():
            continue
        epoch = int(np.argmin(np.where(np.isfinite(curve), curve, np.inf))) + 1

        def at(runs: list[Run], e: int = epoch) -> list[float]:
            return [r.rows[e - 1]["test_loss"] for r in runs if r.finished and len(r.rows) >= e]

        g.fp_lowest = (epoch, welch_difference(at(g.runs), at(fp_runs), loss_margin, alpha))
    adjust_holm([g.fp_lowest[1] for g in groups if g.fp_lowest])
    adjust_holm([g.own_lowest for g in groups if g.own_lowest])


def _lowest_losses(g: Group) -> list[float]:
    """Each finished run's lowest finite test loss."""
    return [min(v for v in x if math.isfinite(v)) for x in _finished_losses(g)]


def fp_lowest_markdown(groups: list[Group]) -> list[str]:
    """The table of `loss_at_fp_lowest`; no lines without a compared group."""
    rows = []
    for g in groups:
        if g.fp_lowest:
            rows.append((g, f"fp's best epoch ({g.fp_lowest[0]})", g.fp_lowest[1]))
        if g.own_lowest:
            rows.append((g, "each run's own lowest", g.own_lowest))
    if not rows:
        return []
    tests = sum(bool(g.fp_lowest and g.fp_lowest[1].available) for g in groups)
    margin = rows[0][2].margin
    lines = ["", "Test loss at the lowest point, against full precision's (group − fp). At fp's "
             "best epoch: the epoch where the fp group's mean test loss over its finished seeds "
             "is lowest, and each quantized group's test loss there. That epoch is picked on "
             "fp's own test curve, which favours fp: its value there is biased low, the "
             "difference toward positive. Each run's own lowest: the minimum of each run's test "
             "loss at whatever epoch, picked on the test set alike on both sides. Welch p "
             + (f"Holm-adjusted over the {tests} group{'s' * (tests != 1)} of this table, one "
                f"family for each of the two rows' kinds; TOST at ±{margin:g} loss, families of "
                "their own." if tests else
                "possible with 2 or more finished seeds on each side (not yet)."), "",
             f"| group | where | {DIFFERENCE_HEADER} |", "|---" * 9 + "|"]
    lines += [f"| {g.label} | {where} | {difference_cells(d, 'test_loss')} |"
              for g, where, d in rows]
    return lines


def _families(compared: list[Group], labels: dict[str, str]) -> str:
    """Each metric's family and its size, e.g. ``test acc, last 5: 12 tests; ...``."""
    sizes = [(labels[m], sum(g.vs_fp[m].available for g in compared if m in g.vs_fp))
             for m in TESTED]
    return "; ".join(f"{label}: {n} test{'s' * (n != 1)}" if n else f"{label}: none"
                     for label, n in sizes)


def _unmatched_markdown(groups: list[Group]) -> list[str]:
    """The quantized groups no fp group matches, and the first key each differs in from fp."""
    fps = [g for g in groups if g.is_fp]
    alone = [g for g in groups if not g.is_fp and not g.vs_fp]
    if not fps or not alone:  # without fp at all there is nothing to say (a teachers' table)
        return []

    def differs(g: Group) -> str:
        other, mine = _without_quant(fps[0].key), _without_quant(g.key)
        key = next(k for k in sorted(other.keys() | mine.keys()) if other.get(k) != mine.get(k))
        return f"{g.label} (differs from {fps[0].label} in {key})"
    return ["", "Not compared with full precision (no fp group matches them in everything but "
            "quantization): " + "; ".join(map(differs, alone)) + "."]


def _differences_markdown(compared: list[Group], labels: dict[str, str]) -> list[str]:
    """The differences to full precision: what they test, over which families, and the table."""
    if not compared:
        return []
    margins = compared[0].vs_fp
    acc_m = 100 * margins["final_test_acc"].margin
    loss_m = margins["final_test_loss"].margin
    tests = sum(d.available for g in compared for d in g.vs_fp.values())
    lines = [""]
    if not tests:  # no group has two finished seeds on both sides: nothing can be tested
        lines.append("Differences to full precision: no test is possible yet (each side needs at "
                     "least two finished seeds); the differences of the means are shown without "
                     "p-values.")
    else:
        families = _families(compared, labels)
        lines.append(
            f"Differences to full precision (group − fp, matched in everything but "
            f"quantization): 95% confidence interval (Welch–Satterthwaite); Welch t-test "
            f"p-value, raw and Holm-adjusted over its question's family: the tests of the same "
            f"metric across this table's groups, one family per metric ({families}) "
            f"(differs: Holm p < 0.05); TOST equivalence p-value at a margin of "
            f"±{acc_m:g} accuracy points and ±{loss_m:g} loss, raw and Holm-adjusted over the "
            f"same metric's TOST tests, a family of their own of the same size (equivalent: "
            f"TOST Holm p < 0.05). Resolvable margin: the half-width of the 90% confidence "
            f"interval (Welch), the smallest margin TOST can confirm with these seeds even for "
            f"a difference of zero.")
    left_out = [g.vs_fp[m] for g in compared for m in TRAIN_METRICS
                if m in g.vs_fp and g.vs_fp[m].reason.startswith(OLDER_RUNS)]
    if left_out:
        lines[-1] += (f" Train accuracy and the train-test gap are tested only where every run "
                      f"on both sides recorded the eval-mode train accuracy (train_eval_acc): a "
                      f"running train-mode accuracy (dropout on, weights changing) is compared "
                      f"neither with an eval-mode one nor with another running one, so "
                      f"{len(left_out)} of this table's train-accuracy and gap rows are left out "
                      f"of the tests (n/a: {OLDER_RUNS}).")
    header = DIFFERENCE_HEADER.replace("Holm p", "Holm p (this metric's family)")
    lines += ["", f"| group | metric | {header} |", "|---" * 9 + "|"]
    lines += [f"| {g.label} | {labels[m]} | {difference_cells(d, m)} |"
              for g in compared for m, d in g.vs_fp.items()]
    return lines


def compare_markdown(groups: list[Group], runs: list[Run], full_epochs: int | None = None,
                     figure: str | None = None, last_k: int = DEFAULT_LAST_K,
                     dots: str | None = None,
                     placements: list[PlacementPair] | None = None,
                     students: list[Student] | None = None,
                     settings: list[SettingPair] | None = None) -> str:
    """The comparison as Markdown: provenance, per-group table, differences to fp, the
    ``placements`` table (`bitvit.studies.placement`), the ``students`` and distillation
    ``settings`` tables (`bitvit.studies.distillation`), the test-loss turning point, unfinished
    runs, and the links to the curves (``figure``) and the per-seed dot plot (``dots``)."""
    lines = provenance_lines(runs, full_epochs)
    lines.append("")
    mixed = [g.label for g in groups if len(train_acc_kinds(g.runs)) > 1]
    lines.append("Mean ± std (ddof 1) over seeds; accuracies in %. "
                 + " ".join(_notes(runs, last_k))
                 + (f" Groups whose runs mix eval-mode and train-mode train accuracy "
                    f"({', '.join(mixed)}) give no mean of either, nor of the gap (n/a)."
                    if mixed else ""))
    lines.append("")
    cols = list(METRICS)
    labels = metric_labels(runs, last_k)
    lines.append("| group | seeds | " + " | ".join(labels[m] for m in cols) + " |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for g in groups:
        seeds = ", ".join(str(r.seed) for r in g.runs) or "none"
        marks = [f"{len(g.unfinished)} unfinished"] if g.unfinished else []
        cells = [mean_std(g.stats[m], m) for m in cols]
        lines.append(f"| {g.label}{' (' + ', '.join(marks) + ')' if marks else ''} | {seeds} | "
                     + " | ".join(cells) + " |")
    lines += _differences_markdown([g for g in groups if g.vs_fp], labels)
    lines += _unmatched_markdown(groups)
    lines += placements_markdown(placements or [], last_k)
    lines += distillation_markdown(students or [], settings or [], last_k)
    lines += fp_lowest_markdown(groups)
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


def check_margins(margin: float, loss_margin: float) -> None:
    """TOST margins: an accuracy fraction in (0, 1), a positive finite loss (`SweepError`)."""
    if not 0 < margin < 1:  # nan fails both
        raise SweepError(f"--margin {margin}: expected an accuracy fraction above 0 and below 1 "
                         "(0.01 = 1 point)")
    if not 0 < loss_margin < math.inf:
        raise SweepError(f"--loss-margin {loss_margin}: expected a loss above 0")


def compare(paths: list[str | Path], out: str | Path | None = None, margin: float = 0.01,
            loss_margin: float = 0.05, include_unfinished: bool = False,
            full_epochs: int | None = None, title: str = "",
            last_k: int = DEFAULT_LAST_K) -> tuple[list[Group], str]:
    """Load, group and compare run folders; with ``out``, write compare.md, compare.png and
    (once a run is in the statistics) compare-dots.png.
    ``last_k``: the window of the last-k means (test accuracy and loss, train accuracy, gap)."""
    if full_epochs is not None and full_epochs < 1:
        raise SweepError(f"--full-epochs {full_epochs}: expected 1 or more epochs")
    runs = [load_run(p) for p in find_run_dirs(paths)]
    groups = compare_groups(group_runs(runs, include_unfinished), margin, loss_margin,
                            last_k=last_k)
    placements = compare_placements(groups, margin, last_k=last_k)
    students = compare_students(groups, margin, last_k=last_k)
    settings = compare_settings(groups, margin, last_k=last_k)
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
    text = compare_markdown(groups, runs, full_epochs, figure, last_k, dots, placements,
                            students, settings)
    if out is not None:
        files.write_text(out / "compare.md", text)
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
    if not results.is_dir():  # a mistyped --results, or another working directory
        raise SweepError(f"{results}: no such results folder (--results; bitvit report runs "
                         "from the repository root)")
    check_margins(margin, loss_margin)
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
        commands = _read_commands(out / COMMANDS_FILE)
        lines += ["", "Commands:", "", "```",
                  *(commands or [f"bitvit sweep {sweep.path}   # not run yet"]), "```", ""]
        planned = sweep.run_dirs()
        present = {n for n in planned if (out / n / "config.yaml").is_file()}
        missing = [n for n in planned if n not in present]
        if present:
            from bitvit.studies.tuning import rates_section  # it builds on this module

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
    files.write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def _read_commands(path: Path) -> list[str]:
    """The lines of a sweep's commands.txt ([] without one), read within a limit: a huge or
    special file (a FIFO, /dev/zero) is a one-line SweepError naming it, not unbounded memory."""
    if not path.exists() and not path.is_symlink():
        return []
    try:
        return files.read_limited(path, "commands.txt of sweep commands").decode().splitlines()
    except files.FileRefused as e:  # names the file, its size and the limit
        raise SweepError(str(e)) from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not a text file; expected the commands.txt bitvit sweep "
                         "writes") from None
    except OSError as e:  # a folder, a dangling link, no permission
        raise SweepError(f"{path}: cannot read the commands.txt ({e.strerror or e})") from None


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
