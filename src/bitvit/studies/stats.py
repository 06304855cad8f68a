"""The statistics of the studies, as pure functions: summaries over seeds, a headline that is not
one noisy epoch, Welch differences with TOST equivalence, Holm's correction over the tests of one
question (a family), and where a test loss turns upward."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); nan with one value
    min: float
    max: float


def summarize(values: Sequence[float]) -> Summary:
    """n, mean, std, min and max of ``values``; with a non-finite value (a diverged run, an
    edited metrics.csv) or values too large to average, every statistic but n is nan (n/a)."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    nan = Summary(int(a.size), math.nan, math.nan, math.nan, math.nan)
    if not np.isfinite(a).all():
        return nan
    with np.errstate(all="ignore"):  # 1e308s overflow the mean or the variance: n/a, no warning
        mean = float(a.mean())
        std = float(a.std(ddof=1)) if a.size > 1 else math.nan
    if not math.isfinite(mean) or a.size > 1 and not math.isfinite(std):
        return nan
    return Summary(int(a.size), mean, std, float(a.min()), float(a.max()))


def finite_mean(values: Sequence[float]) -> float:
    """The mean of ``values``; nan when there are none, when one is not finite, or when they
    are too large to sum (math.fsum raises on an intermediate overflow, and on inf - inf)."""
    values = list(values)
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    try:
        return math.fsum(values) / len(values)
    except OverflowError:  # each value / n stays finite, and so does their sum
        return math.fsum(v / len(values) for v in values)


def last_k_mean(values: Sequence[float], k: int) -> float:
    """The mean of the last ``k`` values (all of them when there are fewer); nan when none, or
    when one of them is not finite (`finite_mean`).

    Test accuracy moves about a point between neighbouring epochs, so the last epoch alone is a
    noisy statistic of where a run ended; a few epochs' mean is steadier.
    """
    if k < 1:
        raise ValueError(f"k={k}: expected 1 or more")
    return finite_mean(list(values)[-k:])


@dataclass
class Difference:
    """mean(a) - mean(b) with Welch's t statistics, and a TOST equivalence test at ``margin``."""

    diff: float
    ci_low: float
    ci_high: float
    df: float
    p_value: float  # Welch's t-test, two-sided: H0 mean(a) == mean(b)
    margin: float
    tost_p: float  # H0 |mean(a) - mean(b)| >= margin; small p: equivalent within the margin
    alpha: float = 0.05
    reason: str = ""  # why the statistics are not available (then the numbers are nan)
    # The half-width of the (1 - 2 alpha) CI: TOST finds equivalence exactly when that CI lies
    # within +-margin, so with these seeds no margin below this can be confirmed, even for an
    # observed difference of zero.
    resolvable: float = math.nan
    # p_value adjusted for the other tests of its family (Holm; `adjust_holm`): the tests of one
    # question, e.g. one metric against full precision across a table's groups; p_value itself
    # until then.
    p_adjusted: float = math.nan
    # tost_p adjusted likewise, over the TOST tests of the same question (their own family).
    tost_adjusted: float = math.nan
    # How many tests that family holds (Welch and TOST alike); 0 until `adjust_holm`.
    family: int = 0

    @property
    def available(self) -> bool:
        return not self.reason

    @property
    def significant(self) -> bool:
        return self.available and self.p_adjusted < self.alpha

    @property
    def equivalent(self) -> bool:
        return self.available and self.tost_adjusted < self.alpha

    @property
    def verdict(self) -> str:
        if not self.available:
            return "n/a"
        if self.significant and self.equivalent:
            return "differs, within the margin"
        if self.significant:
            return "differs"
        if self.equivalent:
            return "equivalent"
        return "inconclusive"


def welch_difference(a: Sequence[float], b: Sequence[float], margin: float,
                     alpha: float = 0.05) -> Difference:
    """Difference of means a - b: (1 - alpha) CI with Welch-Satterthwaite degrees of freedom,
    Welch's two-sided t-test, two one-sided Welch tests (TOST) against +-margin, and the margin
    these samples can resolve (the half-width of the (1 - 2 alpha) CI)."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    nan = math.nan
    with np.errstate(all="ignore"):  # inf - inf: nan, no warning
        diff = float(a.mean() - b.mean()) if a.size and b.size else nan
    if a.size < 2 or b.size < 2:
        return Difference(diff, nan, nan, nan, nan, margin, nan, alpha,
                          reason=f"needs at least 2 seeds per group (has {a.size} and {b.size})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # a diverged or edited run
        return Difference(nan, nan, nan, nan, nan, margin, nan, alpha,
                          reason="a value is not finite (nan or inf)")
    # Values near the float range (1e308) overflow the variances: untested, without warnings.
    with np.errstate(all="ignore"):
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        se = float(np.sqrt(va + vb))
        df = float((va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)))
    if not (math.isfinite(diff) and math.isfinite(se)):
        return Difference(nan, nan, nan, nan, nan, margin, nan, alpha,
                          reason="values too large to compare")
    scale = max(1.0, abs(float(a.mean())), abs(float(b.mean())))
    if se <= 1e-12 * scale:  # every seed gave the same number in both groups: no spread at all
        p = 1.0 if abs(diff) <= 1e-12 * scale else 0.0
        tost = 0.0 if abs(diff) < margin else 1.0
        return Difference(diff, diff, diff, math.inf, p, margin, tost, alpha, resolvable=0.0,
                          p_adjusted=p, tost_adjusted=tost)
    if not math.isfinite(df):  # the squares of the variances overflow
        return Difference(diff, nan, nan, nan, nan, margin, nan, alpha,
                          reason="values too large to compare")
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    # TOST: H0 diff <= -margin (tested on a + margin > b) and H0 diff >= margin (a - margin < b).
    p_low = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    p_high = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    tost = float(max(p_low, p_high))
    return Difference(diff, diff - half, diff + half, df, p, margin, tost, alpha,
                      resolvable=float(stats.t.ppf(1 - alpha, df)) * se, p_adjusted=p,
                      tost_adjusted=tost)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given; nan (no test) stays nan and does
    not count as a test.

    The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1), capped at 1, and
    made non-decreasing in that order; rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def adjust_holm(differences: Sequence[Difference]) -> None:
    """Holm over one question's differences (one family; the unavailable ones are no test):
    their Welch p-values (``p_adjusted``) as one family and their TOST p-values
    (``tost_adjusted``) as another, so that both "differs" and "equivalent" are claims about
    every test of the question, not one test picked from it. ``family`` records the size.

    A question is what the caller asks once per comparison, e.g. "does the last-5 test accuracy
    differ from full precision?" across a table's groups (`bitvit.studies.report` calls this
    once per metric), or "does the placement matter?" over a table of placement pairs."""
    tested = [d for d in differences if d.available]
    welch = holm([d.p_value for d in tested])
    tost = holm([d.tost_p for d in tested])
    for d, p, q in zip(tested, welch, tost, strict=True):
        d.p_adjusted, d.tost_adjusted, d.family = p, q, len(tested)


# The reference a run's rise is measured from: the mean of this many epochs around the lowest
# point (fewer would make the rise as noisy as one epoch).
REFERENCE_EPOCHS = 3


@dataclass(frozen=True)
class TurningPoint:
    """Where one run's test loss is lowest, and whether it rises clearly after that."""

    epoch: int  # 1-based epoch of the run's own lowest loss (the first, on ties)
    lowest: float
    reference: int | None  # 1-based epoch where the group's *other* runs' mean loss is lowest
    rise: float  # mean of the last k losses - mean around ``reference``; nan: cannot tell
    noise: float  # std (ddof 1) of the successive differences within the last k epochs
    rises: bool | None  # None: cannot tell (one run, too short, k < 3, a non-finite loss)


def turning_points(runs: Sequence[Sequence[float]], k: int) -> list[TurningPoint]:
    """Each run's turning point, its rise measured from where the *other* runs' mean test loss
    is lowest (leave one out). Measured from the run's own lowest point, a flat, jittery curve
    would rise on average (the minimum of noise lies below its level: 87% of flat runs of 100
    epochs "rose"); from an epoch chosen on the other seeds, the rise is unbiased. A group of
    one run has no other runs: its rise cannot be told."""
    return [turning_point(losses, k, _lowest_of_mean(
        [r for j, r in enumerate(runs) if j != i], len(losses))) for i, losses in enumerate(runs)]


def _lowest_of_mean(runs: Sequence[Sequence[float]], n: int) -> int | None:
    """0-based epoch (< n) of the lowest mean loss over ``runs`` (non-finite values left out)."""
    import numpy as np

    if not runs:
        return None
    a = np.full((len(runs), n), np.nan)
    for row, r in zip(a, runs, strict=True):
        values = np.asarray(r[:n], dtype=float)
        row[:values.size] = np.where(np.isfinite(values), values, np.nan)
    seen = np.isfinite(a).any(axis=0)
    if not seen.any():
        return None
    with np.errstate(all="ignore"):
        mean = np.where(seen, np.nanmean(np.where(seen, a, 0.0), axis=0), np.inf)
    return int(np.argmin(mean))


def turning_point(losses: Sequence[float], k: int, reference: int | None) -> TurningPoint:
    """A run rises when ``reference`` (0-based; see `turning_points`) comes before its last
    ``k`` epochs and the mean of those k epochs exceeds the mean of the `REFERENCE_EPOCHS`
    around the reference (moved to end before the window) by more than the epoch-to-epoch noise
    of the window (the std of its k - 1 successive differences), so that a flat, jittery tail
    does not count as a rise. A loss still falling gives a negative rise.

    Runs of fewer than k + `REFERENCE_EPOCHS` epochs are too short to tell.
    """
    import numpy as np

    if k < 1:
        raise ValueError(f"k={k}: expected 1 or more")
    a = np.asarray(losses, dtype=float)
    if a.size == 0 or not np.isfinite(a).any():
        raise ValueError("turning_point: expected at least one finite loss")
    i = int(np.nanargmin(np.where(np.isfinite(a), a, np.nan)))
    lowest = float(a[i])
    if reference is None or a.size < k + REFERENCE_EPOCHS:
        return TurningPoint(i + 1, lowest, None if reference is None else reference + 1,
                            math.nan, math.nan, None)
    start = min(max(reference - REFERENCE_EPOCHS // 2, 0), a.size - k - REFERENCE_EPOCHS)
    window = a[-k:]
    with np.errstate(all="ignore"):  # inf and nan: a nan rise or noise, quietly
        rise = float(window.mean()) - float(a[start:start + REFERENCE_EPOCHS].mean())
        steps = np.diff(window)
        noise = float(steps.std(ddof=1)) if steps.size > 1 else math.nan
    told = math.isfinite(rise) and math.isfinite(noise)
    return TurningPoint(i + 1, lowest, reference + 1, rise, noise,
                        (reference < a.size - k and rise > noise) if told else None)


def positive_p_value(rises: Sequence[float]) -> float:
    """One-sided one-sample t-test across seeds, H0: mean <= 0 (small p: the values are above
    zero: a test loss's rise, a student's lead over its teacher); nan with fewer than 2 finite
    values."""
    import numpy as np
    from scipy import stats

    a = np.asarray([r for r in rises if math.isfinite(r)], dtype=float)
    if a.size < 2:
        return math.nan
    with np.errstate(all="ignore"):
        spread, mean = float(a.std(ddof=1)), float(a.mean())
    if not (math.isfinite(spread) and math.isfinite(mean)):  # values near 1e308: no test
        return math.nan
    if spread <= 1e-12 * max(1.0, abs(mean)):  # no spread: t is +-inf or 0/0
        return 0.0 if mean > 0 else 1.0
    return float(stats.ttest_1samp(a, 0.0, alternative="greater").pvalue)
