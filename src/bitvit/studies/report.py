"""Comparison and report: the statistics against full precision, the Markdown tables and
``results/README.md``, from the runs and groups of `bitvit.studies.runs`.

`bitvit.studies.runs.load_run` reads run folders (metrics.csv, config.yaml, run.json);
`group_runs` groups runs whose configs are equal except for the seed and settings that do not
change the experiment (device, data location, compile, eval batch size); `compare_groups`
computes per-group mean +- std over seeds (test accuracy and loss over the last k epochs and at
the final one, train accuracy and the train-test gap from the eval-mode ``train_eval_acc`` where
runs have it) and, for each quantized group, the difference to its full-precision group: a 95%
confidence interval (Welch-Satterthwaite), Welch's t-test p-value and a TOST equivalence test at
a stated margin, each Holm-adjusted over the table (two families), beside the margin the seeds
can resolve (`bitvit.studies.stats`). `compare_markdown` and `plot_groups`
(`bitvit.studies.figures`) turn that into tables (with `turning_markdown`: where each test loss
is lowest and whether it rises after) and the first study's figure; `write_report` regenerates
``results/README.md``, with `bitvit.studies.tuning`'s section (each method at its own learning
rate) for sweeps over ``train.lr`` with a validation split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bitvit import files
from bitvit.studies.figures import plot_dots, plot_groups
from bitvit.studies.runs import (
    DEFAULT_LAST_K,
    METRICS,
    TESTED,
    Group,
    Run,
    find_run_dirs,
    group_runs,
    has_val,
    load_run,
    metric_labels,
    provenance_lines,
    train_acc_column,
)
from bitvit.studies.stats import (
    Difference,
    Summary,
    adjust_holm,
    holm,
    rise_p_value,
    summarize,
    turning_point,
    welch_difference,
)
from bitvit.studies.sweep import (
    COMMANDS_FILE,
    SWEEP_COPY,
    Sweep,
    SweepError,
    load_sweep,
)

# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


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


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
