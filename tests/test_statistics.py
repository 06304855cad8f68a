"""The studies' statistics: Holm's correction, the last-k headline, the resolvable margin, the
test-loss turning point, and tables of run folders with and without the eval-mode train accuracy
and a validation split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats
from test_studies import fake_run

from bitvit.cli import main
from bitvit.studies.report import compare, compare_groups, verdict_text
from bitvit.studies.runs import group_runs, load_run
from bitvit.studies.stats import (
    Difference,
    adjust_holm,
    holm,
    last_k_mean,
    rise_p_value,
    turning_point,
    welch_difference,
)
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
    t = turning_point(U_SHAPE, 3)
    assert (t.epoch, t.lowest) == (4, 1.0)
    assert t.rise == pytest.approx((1.4 + 1.55 + 1.6) / 3 - 1.0)
    assert t.noise == pytest.approx(stats.tstd([0.15, 0.05]))  # successive differences, ddof 1
    assert t.rises is True


def test_a_falling_or_flat_noisy_loss_does_not_rise():
    # Falling to the end: the lowest is the last epoch, inside the window; the rise, from the
    # lowest before the window (1.5), is negative.
    falling = turning_point([2.0, 1.8, 1.6, 1.5, 1.45, 1.42, 1.40], 3)
    assert falling.epoch == 7 and falling.rises is False
    assert falling.rise == pytest.approx((1.45 + 1.42 + 1.40) / 3 - 1.5)
    # A flat jittery tail after the lowest epoch: a rise above 0, within the noise.
    flat = turning_point([2.0, 1.5, 1.0, 0.99, 1.03, 0.99, 1.04, 1.00, 1.03], 5)
    assert flat.epoch == 4 and flat.epoch <= 9 - 5  # before the last 5 epochs
    assert flat.rise == pytest.approx(0.028)
    assert flat.noise == pytest.approx(stats.tstd([-0.04, 0.05, -0.04, 0.03]))
    assert 0 < flat.rise < flat.noise and flat.rises is False
    # The same tail, shifted up by more than its noise, rises.
    tail = [x + 0.1 for x in [1.03, 0.99, 1.04, 1.00, 1.03]]
    assert turning_point([2.0, 1.5, 1.0, 0.99, *tail], 5).rises is True


def test_turning_point_of_short_runs_and_bad_input():
    short = turning_point([1.0, 0.9, 1.0, 1.1], 3)  # fewer than k + 2 = 5 epochs
    assert (short.epoch, short.lowest, short.rises) == (2, 0.9, None)
    assert math.isnan(short.rise)
    assert turning_point([2.0, 1.0, 1.3, 1.35, 1.45], 3).rises is True  # k + 2 are enough
    no_noise = turning_point(U_SHAPE, 2)  # one difference in the window: no std
    assert no_noise.rise == pytest.approx(0.575) and no_noise.rises is None
    diverged = turning_point([2.0, 1.0, 1.5, 2.0, math.nan], 2)
    assert diverged.epoch == 2 and diverged.rises is None
    with pytest.raises(ValueError, match="k=0"):
        turning_point(U_SHAPE, 0)
    with pytest.raises(ValueError, match="finite loss"):
        turning_point([], 3)


def test_rise_t_test_is_scipy_one_sided_one_sample():
    rises = [0.10, 0.20, 0.05, 0.12]
    expected = stats.ttest_1samp(rises, 0.0, alternative="greater").pvalue
    assert rise_p_value(rises) == pytest.approx(expected)
    t = stats.tmean(rises) / (stats.tstd(rises) / math.sqrt(4))
    assert rise_p_value(rises) == pytest.approx(stats.t.sf(t, 3))  # by definition
    assert rise_p_value([-0.1, 0.02, -0.05]) > 0.5  # falls on average
    assert math.isnan(rise_p_value([0.3]))  # one run: no test
    assert rise_p_value([0.2, 0.2]) == 0.0 and rise_p_value([0.0, 0.0]) == 1.0  # no spread


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
    assert ("a run counts as rising when its lowest test loss comes before its last 3 epochs "
            "and the mean of those 3 epochs exceeds that lowest loss by more than the run's "
            "epoch-to-epoch noise") in text
    table = [line.split(" | ") for line in text[head:].splitlines() if line.startswith("| ")]
    method = {g.label: g.key["quant.method"] for g in groups}
    rows = {method[cells[0][2:]]: cells[1:] for cells in table[1:]}
    rise = (1.4 + 1.55 + 1.6) / 3 - 1.0
    fp_rises = [rise + s / 75 for s in range(3)]  # seed / 100 everywhere, seed / 20 at the end
    falling_rise = (1.40 + 1.39 + 1.38) / 3 - 1.42  # from the lowest before the window
    one_sided = {"popmean": 0.0, "alternative": "greater"}
    fp_p = stats.ttest_1samp(fp_rises, **one_sided).pvalue
    b158_p = stats.ttest_1samp([falling_rise, falling_rise, rise], **one_sided).pvalue
    holm_p = holm([fp_p, b158_p, math.nan])
    assert rows["fp"][:5] == ["3", "4.0 ± 0.0", "1.0100 ± 0.0100",
                              f"{rise + 1 / 75:.4f} ± {stats.tstd(fp_rises):.4f}", "3 of 3"]
    b158 = rows["b158"]
    assert b158[0] == "3" and b158[1] == f"{(9 + 9 + 4) / 3:.1f} ± {stats.tstd([9, 9, 4]):.1f}"
    assert b158[4] == "1 of 3"
    assert b158[5] == f"{b158_p:.3g}" and b158[6] == f"{holm_p[1]:.3g} |"
    assert rows["fp"][5:] == [f"{fp_p:.3g}", f"{holm_p[0]:.3g} |"]
    assert rows["sign"][4:] == ["n/a (too short)", "n/a", "n/a |"]
    assert "raw and Holm-adjusted over the 2 tests of this table" in text
    _, only_short = compare([out / "method=sign_seed=0"], last_k=3)
    assert "possible with 2 or more finished runs per group (none yet)" in only_short


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


def _study(tmp_path: Path, train_eval: bool, val: bool) -> Path:
    """fp and b158 over 3 seeds, 6 epochs; b158's test accuracy ~2 points up."""
    out = tmp_path / "study"
    for method, up in (("fp", 0.0), ("b158", 0.02)):
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
    # Holm over the 6 tests of the table; the verdicts follow the adjusted p.
    diffs = list(groups[1].vs_fp.values())
    assert len(diffs) == 6
    assert [d.p_adjusted for d in diffs] == pytest.approx(holm([d.p_value for d in diffs]))
    assert [d.tost_adjusted for d in diffs] == pytest.approx(holm([d.tost_p for d in diffs]))
    assert "Holm-adjusted over the 6 tests of this table" in text
    assert "Holm-adjusted over the 6 TOST tests of this table" in text
    assert "| Welch p | Holm p | TOST p | TOST Holm p | resolvable margin | verdict |" in text


def test_tables_of_old_run_folders_say_what_their_train_accuracy_is(tmp_path):
    groups, text = compare([_study(tmp_path, train_eval=False, val=False)])
    fp = groups[0]
    # fake_run's train_acc is test_acc + 0.1: the gap over the last 5 epochs is 0.1.
    assert fp.values("gap") == pytest.approx([0.1] * 3)
    assert fp.values("best_test_acc") == pytest.approx([0.51, 0.515, 0.52])  # max over epochs
    assert "| best test acc (optimistic) |" in text
    assert "train acc (running, train mode), last 5" in text
    assert "running average over each epoch in train mode (train_acc" in text


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
