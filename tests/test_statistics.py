"""The studies' statistics: Holm's correction, the last-k headline, the resolvable margin, the
test-loss turning point, and tables of run folders with and without the eval-mode train accuracy
and a validation split."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_studies import fake_run

from bitvit.cli import main
from bitvit.studies.placement import compare_placements
from bitvit.studies.report import compare, compare_groups
from bitvit.studies.runs import group_runs, load_run
from bitvit.studies.stats import (
    Difference,
    adjust_holm,
    holm,
    last_k_mean,
    positive_p_value,
    turning_point,
    turning_points,
    welch_difference,
)
from bitvit.studies.tables import verdict_text
from bitvit.training.rundir import (
    METRIC_COLUMNS,
    TRAIN_EVAL_COLUMNS,
    VAL_COLUMNS,
    read_metrics,
    write_metrics,
)


def holm_by_definition(p: list[float]) -> list[float]:
    """Holm straight from its definition: the adjusted p of test i is the largest, over the tests
    ranked at or before it, of (m - rank + 1) * p, capped at 1."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    return [max(min(1.0, (m - r) * p[ranked[r]]) for r in range(ranked.index(i) + 1))
            for i in range(m)]


def test_holm_on_a_known_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 -> max(0.06, 0.04)
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm(p) == pytest.approx(holm_by_definition(p))
    many = [0.2, 0.001, 0.04, 0.5, 0.012, 0.0105, 0.9]
    assert holm(many) == pytest.approx(holm_by_definition(many))
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    # No test (nan) is not counted: the other two form a family of two.
    out = holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


def _difference(p_value: float, tost_p: float) -> Difference:
    """A difference of 0.1 points with given raw p-values (CI within a 1-point margin)."""
    return Difference(0.001, -0.004, 0.006, 4.0, p_value, 0.01, tost_p, resolvable=0.004,
                      p_adjusted=p_value, tost_adjusted=tost_p)


def test_tost_p_values_are_holm_adjusted_as_their_own_family():
    tost = [0.01, 0.04, 0.03, 0.005]
    diffs = [_difference(0.5, p) for p in tost]
    diffs.append(Difference(math.nan, *[math.nan] * 4, 0.01, math.nan, reason="one seed"))
    adjust_holm(diffs)
    # The same known example as Holm's: the unavailable difference is no test.
    assert [d.tost_adjusted for d in diffs[:4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(diffs[4].tost_adjusted)
    # The Welch p-values are a family of their own: four times 0.5 gives 1 each.
    assert [d.p_adjusted for d in diffs[:4]] == pytest.approx([1.0] * 4)
    # Equivalence is decided by the adjusted TOST p: raw 0.04 and 0.03 no longer pass.
    assert [d.equivalent for d in diffs[:4]] == [True, False, False, True]
    assert [d.verdict for d in diffs[:4]] == ["equivalent", "inconclusive", "inconclusive",
                                              "equivalent"]
    assert verdict_text(diffs[1], "last_test_acc") == (
        "inconclusive: TOST p < 0.05 only before Holm")
    both = _difference(0.03, 0.03)
    adjust_holm([both, _difference(0.04, 0.04)])  # both families: 0.06, 0.06
    assert verdict_text(both, "last_test_acc") == (
        "inconclusive: Welch p < 0.05 only before Holm; TOST p < 0.05 only before Holm")


def test_last_k_mean_on_fixed_numbers():
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert last_k_mean(values, 5) == pytest.approx(0.5)
    assert last_k_mean(values, 1) == 0.7
    assert last_k_mean(values, 10) == pytest.approx(0.4)  # fewer epochs: all of them
    assert math.isnan(last_k_mean([], 5))
    with pytest.raises(ValueError):
        last_k_mean(values, 0)


U_SHAPE = [2.0, 1.5, 1.2, 1.0, 1.1, 1.25, 1.4, 1.55, 1.6]  # lowest at epoch 4, then up


def test_turning_point_of_a_u_shaped_loss():
    t = turning_point(U_SHAPE, 3, reference=3)  # the others' lowest: epoch 4
    assert (t.epoch, t.lowest, t.reference) == (4, 1.0, 4)
    assert t.rise == pytest.approx((1.4 + 1.55 + 1.6) / 3 - (1.2 + 1.0 + 1.1) / 3)
    assert t.noise == pytest.approx(stats.tstd([0.15, 0.05]))  # successive differences, ddof 1
    assert t.rises is True


def test_the_rise_is_measured_where_the_other_runs_are_lowest():
    runs = [U_SHAPE, [x + 0.01 for x in U_SHAPE], [2.0, 1.4, 1.3, 1.2, 1.0, 1.2, 1.3, 1.5, 1.6]]
    points = turning_points(runs, 3)
    assert [t.reference for t in points] == [5, 5, 4]  # the others' mean curve's lowest
    assert [t.epoch for t in points] == [4, 4, 5]  # each run's own lowest, as it is
    third = runs[2]
    assert points[2].rise == pytest.approx(sum(third[-3:]) / 3 - sum(third[2:5]) / 3)
    alone = turning_points([U_SHAPE], 3)[0]  # no other run to pick the epoch: cannot tell
    assert (alone.epoch, alone.reference, alone.rises) == (4, None, None)
    assert math.isnan(alone.rise)


def test_a_flat_noisy_loss_rises_as_often_as_chance_says():
    # From each run's own minimum, 87% of flat 100-epoch runs "rose" and the t-test said so for
    # 99.5% of groups; measured where the other seeds are lowest, the rise is unbiased.
    rng = np.random.default_rng(0)
    trials, rejected, rising = 2000, 0, 0
    for _ in range(trials):
        runs = (1.6 + 0.01 * rng.standard_normal((3, 30))).tolist()
        points = turning_points(runs, 5)
        rejected += positive_p_value([t.rise for t in points]) < 0.05
        rising += sum(bool(t.rises) for t in points)
    assert 0.03 < rejected / trials < 0.07
    assert rising / (3 * trials) < 0.05


def test_a_falling_or_flat_noisy_loss_does_not_rise():
    # Falling to the end: the others' lowest is the last epoch, inside the window; the rise,
    # from the 3 epochs before the window, is negative.
    falling = turning_point([2.0, 1.8, 1.6, 1.5, 1.45, 1.42, 1.40], 3, reference=6)
    assert falling.epoch == 7 and falling.rises is False
    assert falling.rise == pytest.approx((1.45 + 1.42 + 1.40) / 3 - (1.8 + 1.6 + 1.5) / 3)
    # A flat jittery tail after the lowest epoch: a rise above 0, within the noise.
    flat = turning_point([2.0, 1.0, 1.0, 0.99, 1.03, 0.99, 1.04, 1.00, 1.03, 1.01], 5,
                         reference=3)
    assert flat.epoch == 4 and flat.reference <= 10 - 5  # before the last 5 epochs
    assert flat.rise == pytest.approx(1.014 - (1.0 + 0.99 + 1.03) / 3)
    assert flat.noise == pytest.approx(stats.tstd([0.05, -0.04, 0.03, -0.02]))
    assert 0 < flat.rise < flat.noise and flat.rises is False
    # The same tail, shifted up by more than its noise, rises.
    tail = [x + 0.1 for x in [1.03, 0.99, 1.04, 1.00, 1.03]]
    assert turning_point([2.0, 1.0, 1.0, 0.99, 1.0, *tail], 5, reference=3).rises is True


def test_turning_point_of_short_runs_and_bad_input():
    short = turning_point([1.0, 0.9, 1.0, 1.1, 1.2], 3, reference=1)  # fewer than k + 3
    assert (short.epoch, short.lowest, short.rises) == (2, 0.9, None)
    assert math.isnan(short.rise)
    assert turning_point([1.2, 1.0, 1.1, 1.3, 1.35, 1.45], 3, reference=1).rises is True
    no_noise = turning_point(U_SHAPE, 2, reference=3)  # one difference in the window: no std
    assert no_noise.rise == pytest.approx(1.575 - 1.1) and no_noise.rises is None
    diverged = turning_point([2.0, 1.0, 1.5, 2.0, 2.5, math.nan], 2, reference=1)
    assert diverged.epoch == 2 and diverged.rises is None
    with pytest.raises(ValueError, match="k=0"):
        turning_point(U_SHAPE, 0, 3)
    with pytest.raises(ValueError, match="finite loss"):
        turning_point([], 3, None)


def test_rise_t_test_is_scipy_one_sided_one_sample():
    rises = [0.10, 0.20, 0.05, 0.12]
    expected = stats.ttest_1samp(rises, 0.0, alternative="greater").pvalue
    assert positive_p_value(rises) == pytest.approx(expected)
    t = stats.tmean(rises) / (stats.tstd(rises) / math.sqrt(4))
    assert positive_p_value(rises) == pytest.approx(stats.t.sf(t, 3))  # by definition
    assert positive_p_value([-0.1, 0.02, -0.05]) > 0.5  # falls on average
    assert math.isnan(positive_p_value([0.3]))  # one run: no test
    assert positive_p_value([0.2, 0.2]) == 0.0 and positive_p_value([0.0, 0.0]) == 1.0  # no spread


def test_turning_point_table(tmp_path):
    """fp: 3 seeds, U-shaped (one unfinished run left out); b158: 1 of 3 rises; sign: too short."""
    out = tmp_path / "study"
    falling = [2.0, 1.8, 1.6, 1.5, 1.45, 1.42, 1.40, 1.39, 1.38]
    for seed in range(3):
        fake_run(out / f"method=fp_seed={seed}", [f"train.seed={seed}"], [0.5] * 9,
                 test_loss=[x + seed / 100 for x in U_SHAPE[:-1]] + [1.6 + seed / 20])
        fake_run(out / f"method=b158_seed={seed}", ["quant.method=b158", f"train.seed={seed}"],
                 [0.5] * 9, test_loss=U_SHAPE if seed == 2 else falling)
        fake_run(out / f"method=sign_seed={seed}", ["quant.method=sign", f"train.seed={seed}",
                 "train.epochs=4"], [0.5] * 4, test_loss=[1.0, 0.9, 1.0, 1.1])
    fake_run(out / "method=fp_seed=3", ["train.seed=3"], [0.5] * 2, test_loss=[2.0, 1.9],
             status="interrupted", epochs=9)
    groups, text = compare([out], last_k=3)
    assert [g.key["quant.method"] for g in groups] == ["fp", "b158", "sign"]
    head = text.index("Test-loss turning point")
    assert text.index("| group | metric | difference") < head < text.index("Unfinished runs")
    assert ("the mean test loss of a run's last 3 epochs minus its mean over the 3 epochs "
            "around the epoch where the group's *other* runs' mean test loss is lowest") in text
    table = [line.split(" | ") for line in text[head:].splitlines() if line.startswith("| ")]
    method = {g.label: g.key["quant.method"] for g in groups}
    rows = {method[cells[0][2:]]: cells[1:] for cells in table[1:]}
    # fp: every seed's others are lowest at epoch 4 (index 3): the reference is epochs 3-5.
    rise = (1.4 + 1.55 + 1.6) / 3 - (1.2 + 1.0 + 1.1) / 3
    fp_rises = [rise + s / 75 for s in range(3)]  # seed / 100 everywhere, seed / 20 at the end
    # b158: seeds 0 and 1 (falling) see the others' mean lowest at epoch 4: epochs 3-5 of
    # theirs; seed 2 (U-shaped) sees two falling runs, lowest at the last epoch: no turn, its
    # reference moved to the 3 epochs before the window.
    falling_rise = (1.40 + 1.39 + 1.38) / 3 - (1.6 + 1.5 + 1.45) / 3
    u_rise = (1.4 + 1.55 + 1.6) / 3 - (1.0 + 1.1 + 1.25) / 3
    one_sided = {"popmean": 0.0, "alternative": "greater"}
    fp_p = stats.ttest_1samp(fp_rises, **one_sided).pvalue
    b158_p = stats.ttest_1samp([falling_rise, falling_rise, u_rise], **one_sided).pvalue
    holm_p = holm([fp_p, b158_p, math.nan])
    assert rows["fp"][:5] == ["3", "4.0 ± 0.0", "1.0100 ± 0.0100",
                              f"{rise + 1 / 75:.4f} ± {stats.tstd(fp_rises):.4f}", "3 of 3"]
    b158 = rows["b158"]
    assert b158[0] == "3" and b158[1] == f"{(9 + 9 + 4) / 3:.1f} ± {stats.tstd([9, 9, 4]):.1f}"
    assert b158[4] == "0 of 3"
    assert b158[5] == f"{b158_p:.3g}" and b158[6] == f"{holm_p[1]:.3g} |"
    assert rows["fp"][5:] == [f"{fp_p:.3g}", f"{holm_p[0]:.3g} |"]
    assert rows["sign"][4:] == ["n/a (too short)", "n/a", "n/a |"]
    assert "raw and Holm-adjusted over the 2 tests of this table" in text
    _, only_short = compare([out / "method=sign_seed=0"], last_k=3)
    assert "possible with 2 or more finished runs per group, each long enough to tell (none " \
        "yet)" in only_short


def test_a_group_no_fp_group_matches_is_said(tmp_path):
    out = tmp_path / "study"
    for seed in range(2):
        fake_run(out / f"fp_seed={seed}", [f"train.seed={seed}"], [0.5, 0.5])
        fake_run(out / f"b158_seed={seed}", ["quant.method=b158", f"train.seed={seed}"],
                 [0.5, 0.5, 0.6])
    _, text = compare([out], last_k=2)
    assert ("Not compared with full precision (no fp group matches them in everything but "
            "quantization): b158 epochs=3 (differs from fp epochs=2 in train.epochs).") in text


def test_a_non_finite_loss_is_not_called_too_short(tmp_path):
    out = tmp_path / "study"
    for seed in range(3):
        loss = list(U_SHAPE)
        if seed == 0:
            loss[3] = math.nan  # in the window around the others' lowest epoch: no rise
        fake_run(out / f"method=fp_seed={seed}", [f"train.seed={seed}"], [0.5] * len(loss),
                 test_loss=loss)
    _, text = compare([out], last_k=3)
    row = next(line for line in text[text.index("Test-loss turning point"):].splitlines()
               if line.startswith("| fp |"))
    assert "(1 undecided)" in row and "too short" not in row


def test_test_loss_at_full_precisions_best_epoch(tmp_path):
    """fp's mean test loss is lowest at epoch 3; b158's loss there is lower, though its own
    curve turns upward earlier and ends higher (the case study 1 asks about)."""
    out = tmp_path / "study"
    fp_loss = [2.0, 1.6, 1.4, 1.5, 1.6, 1.7]
    b158_loss = [1.8, 1.3, 1.35, 1.6, 1.8, 2.0]
    for seed in range(3):
        fake_run(out / f"method=fp_seed={seed}", [f"train.seed={seed}"], [0.5] * 6,
                 test_loss=[x + seed / 100 for x in fp_loss])
        fake_run(out / f"method=b158_seed={seed}", ["quant.method=b158", f"train.seed={seed}"],
                 [0.5] * 6, test_loss=[x + seed / 50 for x in b158_loss])
    groups, text = compare([out], last_k=2)
    [b158] = [g for g in groups if not g.is_fp]
    epoch, d = b158.fp_lowest
    assert epoch == 3 and d.family == 1
    expected = welch_difference([1.35, 1.37, 1.39], [1.40, 1.41, 1.42], margin=0.05)
    assert d.diff == pytest.approx(-0.04) and d.p_value == pytest.approx(expected.p_value)
    assert b158.vs_fp["final_test_loss"].diff > 0  # higher at the end, lower at fp's best
    # Each run's own minimum (b158 at epoch 2, fp at epoch 3), a family of its own.
    own = b158.own_lowest
    expected = welch_difference([1.30, 1.32, 1.34], [1.40, 1.41, 1.42], margin=0.05)
    assert own.diff == pytest.approx(-0.09) and own.p_value == pytest.approx(expected.p_value)
    assert own.family == 1 and own.p_adjusted == pytest.approx(expected.p_value)
    head = text.index("Test loss at the lowest point, against full precision's")
    assert "Holm-adjusted over the 1 group of this table" in text[head:]
    assert "picked on fp's own test curve, which favours fp" in text[head:]
    assert "| b158 | fp's best epoch (3) | -0.0400 [" in text[head:]
    assert "| b158 | each run's own lowest | -0.0900 [" in text[head:]


def test_resolvable_margin_is_the_welch_90_percent_half_width():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]  # variances 1 and 4, df 50/17
    d = welch_difference(a, b, margin=0.5)
    se = math.sqrt(1 / 3 + 4 / 3)
    assert d.resolvable == pytest.approx(stats.t.ppf(0.95, 50 / 17) * se)
    # TOST is equivalent exactly when the 90% CI lies within the margin.
    q, fp = [0.502, 0.497, 0.506], [0.500, 0.510, 0.490]
    d = welch_difference(q, fp, margin=0.05)
    assert d.equivalent and abs(d.diff) + d.resolvable < 0.05
    tight = welch_difference(q, fp, margin=abs(d.diff) + d.resolvable * 0.99)
    assert not tight.equivalent


def test_inconclusive_says_why():
    fp, q = [0.50, 0.52, 0.48], [0.51, 0.49, 0.53]  # 3 seeds, ~2 points of spread
    d = welch_difference(q, fp, margin=0.01)
    assert d.verdict == "inconclusive" and d.resolvable > 0.01
    assert verdict_text(d, "last_test_acc") == (
        f"inconclusive: resolvable margin {100 * d.resolvable:.2f} pts > 1.00 pts")
    # A margin the seeds can resolve, but a difference whose CI reaches past it.
    near = welch_difference([0.508, 0.518, 0.528], [0.50, 0.51, 0.52], margin=0.02)
    assert near.resolvable < near.margin < abs(near.diff) + near.resolvable
    assert verdict_text(near, "last_test_acc") == "inconclusive: 90% CI reaches past ±2.00 pts"
    # Significant before Holm, not after: the adjusted p decides, and the verdict says so.
    d = welch_difference([0.60, 0.61, 0.62], [0.50, 0.51, 0.52], margin=0.2)
    d.p_adjusted = 0.2
    assert d.p_value < 0.05 and not d.significant
    assert verdict_text(d, "last_test_loss").startswith("equivalent")
    d.margin, d.tost_p, d.tost_adjusted = 0.01, 0.9, 0.9
    assert verdict_text(d, "last_test_loss") == (
        f"inconclusive: Welch p < 0.05 only before Holm; resolvable margin "
        f"{d.resolvable:.4f} > 0.0100")


def _with_columns(run_dir: Path, **columns: list[float]) -> Path:
    """Add columns (train_eval_*, val_*) to a fake run's metrics.csv, in train()'s order."""
    rows = read_metrics(run_dir / "metrics.csv")
    for name, values in columns.items():
        for row, v in zip(rows, values, strict=True):
            row[name] = v
    order = METRIC_COLUMNS + [c for c in VAL_COLUMNS + TRAIN_EVAL_COLUMNS if c in columns]
    write_metrics(run_dir / "metrics.csv", rows, order)
    return run_dir


def _study(tmp_path: Path, train_eval: bool, val: bool,
           methods: tuple[tuple[str, float], ...] = (("fp", 0.0), ("b158", 0.02))) -> Path:
    """fp and b158 over 3 seeds, 6 epochs; b158's test accuracy ~2 points up."""
    out = tmp_path / "study"
    for method, up in methods:
        for seed in range(3):
            acc = [0.30, 0.40, 0.45, 0.50, 0.49 + up, 0.51 + up + seed / 200]
            run = fake_run(out / f"method={method}_seed={seed}",
                           [f"quant.method={method}", f"train.seed={seed}"], acc)
            extra = {}
            if val:  # validation peaks at epoch 4
                extra |= {"val_loss": [1.0] * 6, "val_acc": [0.3, 0.4, 0.5, 0.6, 0.55, 0.58]}
            if train_eval:
                extra |= {"train_eval_loss": [1.0] * 6,
                          "train_eval_acc": [a + 0.05 + seed / 100 for a in acc]}
            _with_columns(run, **extra)
    return out


def test_tables_of_new_run_folders(tmp_path):
    groups, text = compare([_study(tmp_path, train_eval=True, val=True)], last_k=3)
    fp = groups[0]
    # train (eval) - test, averaged over the last 3 epochs: 0.05 + seed / 100.
    assert fp.values("gap", 3) == pytest.approx([0.05, 0.06, 0.07])
    assert fp.values("train_acc", 3) == pytest.approx(
        [(0.50 + 0.49 + 0.51 + s / 200) / 3 + 0.05 + s / 100 for s in range(3)])
    assert fp.values("best_test_acc", 3) == pytest.approx([0.50] * 3)  # test acc at epoch 4
    assert "| test acc, last 3 | test acc, final | test acc at best val |" in text
    assert "train acc (eval mode), last 3 | train-test gap, last 3 |" in text
    assert "(optimistic)" not in text and "train_acc:" not in text
    # Every run has the eval-mode train accuracy: train accuracy and the gap are tested too.
    diffs = list(groups[1].vs_fp.values())
    assert len(diffs) == 6 and all(d.available for d in diffs)
    # One group against fp: each metric's family holds its one test (Holm changes nothing).
    assert [d.p_adjusted for d in diffs] == pytest.approx([d.p_value for d in diffs])
    assert all(d.family == 1 for d in diffs)
    assert ("one family per metric (test acc, last 3: 1 test; test acc, final: 1 test; "
            "test loss, last 3: 1 test; test loss, final: 1 test; train acc (eval mode), "
            "last 3: 1 test; train-test gap, last 3: 1 test)") in text
    assert "raw and Holm-adjusted over the same metric's TOST tests" in text
    assert ("| Welch p | Holm p (this metric's family) | TOST p | TOST Holm p (this metric's "
            "family) | resolvable margin | verdict |") in text
    assert "left out of the tests" not in text
    assert "Placements" not in text  # no groups that differ only in where they quantize


def test_holm_families_are_one_per_metric(tmp_path):
    """fp, b158 and bitnet on fixed numbers: each metric's two tests (b158 and bitnet against
    fp) are one Holm family, Welch and TOST apart; no metric shares a family with another."""
    study = _study(tmp_path, train_eval=True, val=False,
                   methods=(("fp", 0.0), ("b158", 0.02), ("bitnet", 0.005)))
    groups, text = compare([study], last_k=3)
    b158, bitnet = (next(g for g in groups if g.key["quant.method"] == m)
                    for m in ("b158", "bitnet"))
    fp = groups[0]
    for m in ("last_test_acc", "final_test_acc", "last_test_loss", "final_test_loss",
              "train_acc", "gap"):
        margin = 0.05 if "loss" in m else 0.01
        raw = [welch_difference(g.values(m, 3), fp.values(m, 3), margin) for g in (b158, bitnet)]
        pair = [b158.vs_fp[m], bitnet.vs_fp[m]]
        assert [d.p_value for d in pair] == pytest.approx([d.p_value for d in raw])
        assert [d.p_adjusted for d in pair] == pytest.approx(
            holm_by_definition([d.p_value for d in raw])), m
        assert [d.tost_adjusted for d in pair] == pytest.approx(
            holm_by_definition([d.tost_p for d in raw])), m
        assert [d.family for d in pair] == [2, 2]
    # By hand on this table's numbers: bitnet's last-3 test accuracy is 0.005 * 2 / 3 up on
    # every seed (+0.33 points, no spread in the difference), b158's 0.02 * 2 / 3.
    assert b158.vs_fp["last_test_acc"].diff == pytest.approx(0.04 / 3)
    assert bitnet.vs_fp["last_test_acc"].diff == pytest.approx(0.01 / 3)
    assert "test acc, last 3: 2 tests; test acc, final: 2 tests;" in text
    assert "train-test gap, last 3: 2 tests)" in text


def test_holm_adjust_per_family_on_fixed_p_values():
    """adjust_holm is one family: two metrics' p-values adjusted apart give Holm of each."""
    acc = [_difference(p, 0.5) for p in (0.01, 0.04, 0.03)]
    loss = [_difference(p, 0.5) for p in (0.02, 0.001)]
    adjust_holm(acc)
    adjust_holm(loss)
    assert [d.p_adjusted for d in acc] == pytest.approx(holm_by_definition([0.01, 0.04, 0.03]))
    assert [d.p_adjusted for d in loss] == pytest.approx(holm_by_definition([0.02, 0.001]))
    assert [d.p_adjusted for d in acc] == pytest.approx([0.03, 0.06, 0.06])
    assert [d.p_adjusted for d in loss] == pytest.approx([0.02, 0.002])
    assert [d.family for d in acc + loss] == [3, 3, 3, 2, 2]
    # One table-wide family would have given 0.01 * 4 = 0.04 and 0.02 * 3 = 0.06 instead.
    together = holm_by_definition([0.01, 0.04, 0.03, 0.02, 0.001])
    assert together[0] == pytest.approx(0.04) and together[3] == pytest.approx(0.06)


def test_tables_of_old_run_folders_say_what_their_train_accuracy_is(tmp_path):
    groups, text = compare([_study(tmp_path, train_eval=False, val=False)])
    fp = groups[0]
    # fake_run's train_acc is test_acc + 0.1: the gap over the last 5 epochs is 0.1.
    assert fp.values("gap") == pytest.approx([0.1] * 3)
    assert fp.values("best_test_acc") == pytest.approx([0.51, 0.515, 0.52])  # max over epochs
    assert "| best test acc (optimistic) |" in text
    assert "train acc (running, train mode), last 5" in text
    assert "running average over each epoch in train mode (train_acc" in text
    # Two running train-mode accuracies are not tested against each other: n/a, with the
    # difference of the means, and out of the families (the test metrics keep theirs).
    b158 = groups[1]
    for m in ("train_acc", "gap"):
        d = b158.vs_fp[m]
        assert not d.available and d.reason.startswith("older runs record only train-mode")
        assert d.diff == pytest.approx(
            sum(b158.values(m)) / 3 - sum(fp.values(m)) / 3)
    assert b158.vs_fp["last_test_acc"].available
    assert ("train acc (running, train mode), last 5: none; train-test gap, last 5: none)"
            in text)
    assert ("so 2 of this table's train-accuracy and gap rows are left out of the tests (n/a: "
            "older runs record only train-mode accuracy)") in text
    assert ("| b158 | train-test gap, last 5 | +0.00 | n/a | n/a | n/a | n/a | n/a | n/a: older "
            "runs record only train-mode accuracy (running, dropout on); not tested |") in text


def test_eval_mode_and_train_mode_train_accuracies_are_never_compared(tmp_path):
    """fp's runs are old (train-mode train_acc only), b158's new (train_eval_acc): no train
    accuracy or gap test between them; bitnet's runs mix the two kinds within the group: no
    mean of them, and no test either."""
    out = _study(tmp_path, train_eval=False, val=False)
    for seed in range(3):  # b158 gets the eval-mode train accuracy
        run = out / f"method=b158_seed={seed}"
        _with_columns(run, train_eval_loss=[1.0] * 6,
                      train_eval_acc=[r["test_acc"] + 0.05 for r in read_metrics(
                          run / "metrics.csv")])
    for seed in range(3):  # bitnet: seed 0 new, seeds 1 and 2 old
        run = fake_run(out / f"method=bitnet_seed={seed}",
                       ["quant.method=bitnet", f"train.seed={seed}"],
                       [0.30, 0.40, 0.45, 0.50, 0.50, 0.52 + seed / 200])
        if seed == 0:
            _with_columns(run, train_eval_loss=[1.0] * 6, train_eval_acc=[0.6] * 6)
    groups, text = compare([out])
    fp, b158, bitnet = (next(g for g in groups if g.key["quant.method"] == m)
                        for m in ("fp", "b158", "bitnet"))
    for g in (b158, bitnet):
        for m in ("train_acc", "gap"):
            d = g.vs_fp[m]
            assert not d.available and math.isnan(d.diff) and math.isnan(d.p_adjusted)
            assert "not compared with eval-mode accuracy" in d.reason
    assert b158.vs_fp["train_acc"].reason == (
        "older runs record only train-mode accuracy (fp); not compared with eval-mode accuracy")
    assert "(bitnet and fp)" in bitnet.vs_fp["gap"].reason
    # A group that mixes the kinds has no mean of them; the others keep theirs.
    assert bitnet.stats["train_acc"].n == 0 and bitnet.stats["gap"].n == 0
    assert fp.stats["train_acc"].n == 3 and b158.stats["gap"].n == 3
    assert ("Groups whose runs mix eval-mode and train-mode train accuracy (bitnet) give no "
            "mean of either, nor of the gap (n/a).") in text
    # The test metrics are tested as before, in families of two.
    assert b158.vs_fp["last_test_acc"].family == bitnet.vs_fp["last_test_acc"].family == 2
    assert "train acc (eval mode or running), last 5: none" in text
    assert "so 4 of this table's train-accuracy and gap rows are left out" in text


def test_compare_and_report_take_last_k(tmp_path, capsys):
    study = _study(tmp_path, train_eval=True, val=False)
    assert main(["compare", str(study), "--last-k", "2"]) == 0
    assert "| test acc, last 2 |" in capsys.readouterr().out
    assert main(["compare", str(study), "--last-k", "0"]) == 2
    assert "--last-k 0: expected 1 or more" in capsys.readouterr().err
    runs = [load_run(p) for p in sorted(study.iterdir())]
    groups = compare_groups(group_runs(runs), last_k=1)
    assert groups[0].stats["last_test_acc"].mean == pytest.approx(
        groups[0].stats["final_test_acc"].mean)


def _placements_study(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], list[float]]]:
    """fp; sign at all, mlp and attn; xnor at all and mlp; weights only, 3 seeds, 2 epochs. The
    final test accuracies are fixed numbers (the headline of the last 1 epoch)."""
    out = tmp_path / "placements"
    final = {("fp", "all"): [0.37, 0.38, 0.36],
             ("sign", "all"): [0.22, 0.21, 0.23], ("sign", "mlp"): [0.36, 0.37, 0.37],
             ("sign", "attn"): [0.20, 0.22, 0.21],
             ("xnor", "all"): [0.40, 0.39, 0.40], ("xnor", "mlp"): [0.37, 0.36, 0.38]}
    for (method, where), accs in final.items():
        for seed, acc in enumerate(accs):
            overrides = [f"train.seed={seed}"]
            if method != "fp":
                overrides += [f"quant.method={method}", f"quant.where={where}",
                              "quant.act_bits=none"]
            fake_run(out / f"{method}_{where}_seed={seed}", overrides, [0.1, acc])
    return out, final


def test_placements_table_on_fixed_numbers(tmp_path):
    study, final = _placements_study(tmp_path)
    groups, text = compare([study], last_k=1)
    pairs = compare_placements(groups, margin=0.01, last_k=1)
    # The settings are named by what differs between the groups but the placement.
    assert [(p.setting, p.name) for p in pairs] == [
        ("sign", "all − mlp"), ("sign", "all − attn"), ("sign", "mlp − attn"),
        ("xnor", "all − mlp")]
    expected = [("sign", "all", "mlp"), ("sign", "all", "attn"), ("sign", "mlp", "attn"),
                ("xnor", "all", "mlp")]
    raw = [stats.ttest_ind(final[(m, a)], final[(m, b)], equal_var=False).pvalue
           for m, a, b in expected]
    diffs = [sum(final[(m, a)]) / 3 - sum(final[(m, b)]) / 3 for m, a, b in expected]
    tost = [welch_difference(final[(m, a)], final[(m, b)], 0.01).tost_p for m, a, b in expected]
    assert [p.difference.diff for p in pairs] == pytest.approx(diffs)
    assert [p.difference.p_value for p in pairs] == pytest.approx(raw)
    # One family over the table's four placement tests, TOST another.
    assert [p.difference.p_adjusted for p in pairs] == pytest.approx(holm_by_definition(raw))
    assert [p.difference.tost_adjusted for p in pairs] == pytest.approx(
        holm_by_definition(tost))
    assert all(p.difference.family == 4 for p in pairs)
    assert diffs[0] == pytest.approx(-0.14666666, abs=1e-6)  # sign all - mlp: -14.67 points
    # The table, after the differences to fp and before the turning point.
    head = text.index("Placements (`quant.where`)")
    assert text.index("Differences to full precision") < head < text.index("Test-loss turning")
    assert "raw and Holm-adjusted over the 4 placement tests of this table" in text
    assert "(sign, xnor)" in text
    assert ("| method and activations | placements | difference [95% CI] | Welch p | Holm p "
            "(this table's family) |") in text
    d = pairs[0].difference
    row = (f"| sign | all − mlp | -14.67 [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}] "
           f"| {d.p_value:.3g} | {d.p_adjusted:.3g} | {d.tost_p:.3g} | {d.tost_adjusted:.3g} | ")
    assert row in text
    # The fp table's families are those of its own groups (four quantized groups, one per
    # metric), untouched by the placement tests.
    assert "test acc, last 1: 5 tests" in text


def test_no_placements_table_without_two_placements(tmp_path):
    study, _ = _placements_study(tmp_path)
    for seed in range(3):  # sign only at one placement, xnor at two: one setting left
        for where in ("mlp", "attn"):
            shutil.rmtree(study / f"sign_{where}_seed={seed}")
    groups, text = compare([study], last_k=1)
    assert [p.setting for p in compare_placements(groups, last_k=1)] == ["xnor"]
    assert "over the 1 placement test of this table" in text
    for seed in range(3):
        shutil.rmtree(study / f"xnor_mlp_seed={seed}")
    groups, text = compare([study], last_k=1)
    assert compare_placements(groups) == [] and "Placements" not in text


def test_compare_and_report_refuse_margins_and_folders_that_mean_nothing(tmp_path, capsys,
                                                                          monkeypatch):
    study = _study(tmp_path, train_eval=True, val=False)
    for args, expected in ((["--margin", "-1"], "--margin -1.0: expected an accuracy fraction"),
                           (["--margin", "nan"], "--margin nan: expected an accuracy fraction"),
                           (["--margin", "1"], "--margin 1.0: expected an accuracy fraction"),
                           (["--loss-margin", "inf"], "--loss-margin inf: expected a loss"),
                           (["--loss-margin", "0"], "--loss-margin 0.0: expected a loss"),
                           (["--full-epochs", "0"], "--full-epochs 0: expected 1 or more")):
        assert main(["compare", str(study), *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--results", "missing"]) == 2
    assert "missing: no such results folder" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    (tmp_path / "results").mkdir()
    assert main(["report", "--margin", "0"]) == 2  # checked before anything is written
    assert "--margin 0.0: expected an accuracy fraction" in capsys.readouterr().err
    assert not list((tmp_path / "results").iterdir())
