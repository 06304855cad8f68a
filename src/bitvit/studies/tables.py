"""The cells of the studies' Markdown tables: a number in its metric's units, mean ± std over
seeds, a signed difference, a margin, and a tested difference (CI, Welch and TOST p-values raw
and Holm-adjusted, the resolvable margin, the verdict and why it is inconclusive).

Shared by the comparison against full precision (`bitvit.studies.report`) and the comparison
between placements (`bitvit.studies.placement`); it reads only `bitvit.studies.stats`.
"""

from __future__ import annotations

import math

from bitvit.studies.stats import Difference, Summary


def fmt(x: float, metric: str) -> str:
    """A number in its metric's units: accuracies in %, epochs' time in minutes (seconds under
    6 s), loss as is."""
    if metric == "epochs":
        return "n/a" if not math.isfinite(x) else f"{x:.0f}"
    if metric == "epoch_seconds" and 0 <= x < 6:  # a tiny run: seconds, not "0.0 min"
        return f"{x:.1f} s"
    percent = "acc" in metric or metric == "gap"
    value = x / 60 if metric == "epoch_seconds" else 100 * x if percent else x
    if not math.isfinite(value):  # nan, inf, or a 1e308 that overflowed in the units
        return "n/a"
    # An edited file's 1e308 in four digits, not three hundred.
    text = (f"{value:.4g}" if abs(value) >= 1e9 else f"{value:.1f}" if metric == "epoch_seconds"
            else f"{value:.2f}" if percent else f"{value:.4f}")
    return f"{text} min" if metric == "epoch_seconds" else text


def mean_std(s: Summary, metric: str) -> str:
    if s.n == 0 or math.isnan(s.mean):  # no runs, or a non-finite value among them
        return "n/a"
    if metric == "epochs":  # a count, not a measurement: the range over seeds
        return f"{s.min:.0f}" if s.min == s.max else f"{s.min:.0f}–{s.max:.0f}"
    if s.n == 1:
        return f"{fmt(s.mean, metric)} (1 seed)"
    return f"{fmt(s.mean, metric)} ± {fmt(s.std, metric)}"


def signed(x: float, metric: str) -> str:
    text = fmt(x, metric)
    return text if text.startswith("-") or text == "n/a" else f"+{text}"


def amount(x: float, metric: str) -> str:
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
    margin = amount(d.margin, metric)
    if d.tost_p < d.alpha:  # the 90% CI lies within the margin, but not after the correction
        why.append(f"TOST p < {d.alpha:g} only before Holm")
    elif d.resolvable >= d.margin:
        why.append(f"resolvable margin {amount(d.resolvable, metric)} > {margin}")
    else:
        why.append(f"{100 - 200 * d.alpha:g}% CI reaches past ±{margin}")
    return "inconclusive: " + "; ".join(why)


# The columns `difference_cells` fills, after the columns that name the comparison.
DIFFERENCE_HEADER = ("difference [95% CI] | Welch p | Holm p | TOST p | TOST Holm p | "
                     "resolvable margin | verdict")


def difference_cells(d: Difference, metric: str) -> str:
    """The `DIFFERENCE_HEADER` cells of one difference (n/a where it could not be tested)."""
    if not d.available:
        return f"{signed(d.diff, metric)} | n/a | n/a | n/a | n/a | n/a | {verdict_text(d, metric)}"
    diff = f"{signed(d.diff, metric)} [{signed(d.ci_low, metric)}, {signed(d.ci_high, metric)}]"
    return (f"{diff} | {d.p_value:.3g} | {d.p_adjusted:.3g} | {d.tost_p:.3g} | "
            f"{d.tost_adjusted:.3g} | {amount(d.resolvable, metric)} | {verdict_text(d, metric)}")
