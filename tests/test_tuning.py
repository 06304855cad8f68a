"""Each method at its own learning rate: the choice on validation (ties to the smaller rate), the
rankings on test at the chosen rates and at 1e-3, and no verdict from an incomplete grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_studies import PAPER, fake_run

from bitvit.studies.report import write_report
from bitvit.studies.runs import load_run
from bitvit.studies.stats import holm
from bitvit.studies.sweep import SweepError, load_sweep, point_overrides
from bitvit.studies.tuning import choose_rates, plot_rates, rates_markdown, verdict
from bitvit.training.rundir import METRIC_COLUMNS, VAL_COLUMNS, read_metrics, write_metrics

LRS = (0.0003, 0.001, 0.003)
SEEDS = (0, 1, 2)


def lr_run(run_dir: Path, overrides: list[str], val: float, test: float, seed: int,
           status: str = "finished") -> Path:
    """A finished 3-epoch run with flat validation and test accuracy (seed adds 0.1 points per
    seed to test, 0.1 to validation), val columns in train()'s order."""
    epochs = 3 if status == "finished" else 2
    run = fake_run(run_dir, [*overrides, "data.limit_train=150", "data.val_size=50"],
                   [test + seed / 1000] * epochs, status=status, epochs=3)
    rows = read_metrics(run / "metrics.csv")
    for row in rows:
        row["val_loss"], row["val_acc"] = 1.0, val + seed / 1000
    write_metrics(run / "metrics.csv", rows, METRIC_COLUMNS + VAL_COLUMNS)
    return run


def grid(tmp_path: Path, table: dict[str, dict[float, tuple[float, float]]],
         skip: tuple = ()) -> list:
    """Run folders for {method: {lr: (val, test)}} over 3 seeds, less (method, lr, seed) in skip."""
    runs = []
    for method, by_lr in table.items():
        for lr, (val, test) in by_lr.items():
            for seed in SEEDS:
                if (method, lr, seed) in skip:
                    continue
                run_dir = tmp_path / f"method={method}_lr={lr}_seed={seed}"
                runs.append(load_run(lr_run(run_dir, [f"quant.method={method}", f"train.lr={lr}",
                                                      f"train.seed={seed}"], val, test, seed)))
    return runs


def test_a_ranking_that_changes_at_per_method_rates(tmp_path):
    runs = grid(tmp_path, {
        "fp": {0.0003: (0.45, 0.44), 0.001: (0.50, 0.50), 0.003: (0.40, 0.40)},
        # b158 is worse than fp at 1e-3 but better at its own rate, 3e-3.
        "b158": {0.0003: (0.30, 0.30), 0.001: (0.45, 0.45), 0.003: (0.56, 0.55)},
        # bitnet: validation ties at 3e-4 and 1e-3: the smaller rate is chosen.
        "bitnet": {0.0003: (0.42, 0.30), 0.001: (0.42, 0.42), 0.003: (0.20, 0.20)},
    })
    choice = choose_rates(runs, last_k=2)
    chosen = {m.label: m.chosen for m in choice.methods}
    assert chosen == {"fp": 0.001, "b158": 0.003, "bitnet": 0.0003}
    assert choice.method("bitnet").tied == [0.0003, 0.001]
    assert choice.method("fp").tied == [0.001]
    assert choice.ranking_reference == ["fp", "b158", "bitnet"]
    assert choice.ranking_chosen == ["b158", "fp", "bitnet"]
    assert choice.same_ranking is False
    # Neighbours at the chosen rates: b158 - fp = +5 points, fp - bitnet (at 3e-4) = +20.
    (up1, low1, d1), (up2, low2, d2) = choice.adjacent
    assert (up1, low1, up2, low2) == ("b158", "fp", "fp", "bitnet")
    assert d1.diff == pytest.approx(0.05) and d2.diff == pytest.approx(0.20)
    assert d1.significant and d2.significant
    text = rates_markdown(choice, runs)
    assert "| 0.0003 (tied with 0.001: the smaller) |" in text
    assert "| b158 | 30.10 ± 0.10 | 45.10 ± 0.10 | 56.10 ± 0.10 | 0.003 | 55.10 ± 0.10 | " \
           "45.10 ± 0.10 |" in text
    assert "Ranking by test accuracy (last 2) at lr=0.001: fp > b158 > bitnet." in text
    figure = plot_rates(choice, runs, tmp_path / "lr.png", "Rates")
    assert figure._suptitle.get_text().startswith(
        "Rates\ndevice: cpu (test, 2 threads); 3 epochs\n"
        "training images: 100 (class-balanced subset of 150, 50 held out for validation); "
        "test images: ")
    assert (tmp_path / "lr.png").stat().st_size > 0
    assert verdict(choice).startswith(
        "The ranking at per-method rates differs from the ranking at lr=0.001: b158 > fp > "
        "bitnet (at 0.001: fp > b158 > bitnet). Neighbours at the chosen rates (Welch, Holm "
        "over 2 pairs): b158 − fp +5.00 pts, Holm p ")


def test_a_ranking_that_survives_says_which_orders_are_significant(tmp_path):
    runs = grid(tmp_path, {
        "fp": {0.0003: (0.45, 0.45), 0.001: (0.50, 0.50)},
        "b158": {0.0003: (0.48, 0.47), 0.001: (0.47, 0.46)},
        "bitnet": {0.0003: (0.40, 0.40), 0.001: (0.44, 0.46)},
    })
    # bitnet's test accuracy at 1e-3 is b158's plus noise: the order b158 > bitnet is not real.
    for r in runs:
        if r.config["quant"]["method"] == "bitnet" and r.config["train"]["lr"] == 0.001:
            r.rows = [{**row, "test_acc": [0.44, 0.47, 0.46][r.seed]} for row in r.rows]
    choice = choose_rates(runs, last_k=3)
    assert {m.label: m.chosen for m in choice.methods} == {
        "fp": 0.001, "b158": 0.0003, "bitnet": 0.001}
    assert choice.ranking_reference == choice.ranking_chosen == ["fp", "b158", "bitnet"]
    assert choice.same_ranking is True
    (_, _, first), (_, _, second) = choice.adjacent
    assert first.significant and not second.significant
    assert [first.p_adjusted, second.p_adjusted] == pytest.approx(
        holm([first.p_value, second.p_value]))
    sentence = verdict(choice)
    assert sentence.startswith("The ranking at per-method rates is the same as the ranking at "
                               "lr=0.001: fp > b158 > bitnet.")
    assert "fp − b158 +3.00 pts" in sentence and "(significant)" in sentence
    assert "b158 − bitnet" in sentence and "not significant: this order is not established" \
        in sentence


def test_an_incomplete_grid_gives_no_verdict(tmp_path):
    table = {"fp": {0.0003: (0.45, 0.45), 0.001: (0.50, 0.50)},
             "b158": {0.0003: (0.48, 0.47), 0.001: (0.47, 0.46)}}
    runs = grid(tmp_path, table, skip={("b158", 0.001, 2)})
    unfinished = lr_run(tmp_path / "unfinished", ["quant.method=b158", "train.lr=0.001",
                                                  "train.seed=2"], 0.5, 0.5, 2, status="running")
    choice = choose_rates([*runs, load_run(unfinished)], last_k=2)
    assert not choice.complete and choice.same_ranking is None and not choice.adjacent
    assert choice.method("b158").chosen is None and choice.method("fp").chosen == 0.001
    assert choice.missing() == ["b158 at lr=0.001: seeds 2"]
    text = rates_markdown(choice, runs)
    assert "Missing or unfinished: b158 at lr=0.001: seeds 2." in text
    assert "Not all runs finished: no verdict yet." in text and "Ranking" not in text
    # Planned runs without a folder count as missing too.
    planned = [r.config for r in runs] + [load_run(unfinished).config]
    alone = choose_rates([r for r in runs if r.seed != 1], last_k=2, planned=planned)
    assert not alone.complete and "fp at lr=0.0003: seeds 1" in alone.missing()


def test_a_non_finite_validation_accuracy_or_a_copied_run_gives_no_wrong_choice(tmp_path):
    import shutil

    table = {"fp": {0.0003: (0.45, 0.45), 0.001: (0.50, 0.50)}}
    runs = grid(tmp_path, table)
    edited = runs[0].path / "metrics.csv"  # fp at 3e-4, seed 0: the first cell's first run
    rows = read_metrics(edited)
    rows[-1]["val_acc"] = float("nan")
    write_metrics(edited, rows, METRIC_COLUMNS + VAL_COLUMNS)
    choice = choose_rates([load_run(r.path) for r in runs], last_k=2)  # crashed before
    assert choice.method("fp").chosen is None and choice.missing() == ["fp at lr=0.0003: seeds 0"]
    copy = shutil.copytree(runs[1].path, tmp_path / "copy")
    with pytest.raises(SweepError, match="copy: a second run of seed 1 at lr 0.0003 for fp"):
        choose_rates([*runs, load_run(copy)], last_k=2)


def test_the_report_has_a_section_and_figure_for_a_sweep_over_the_rate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    sweep_path = tmp_path / "studies/lr.yaml"
    sweep_path.write_text(yaml.safe_dump({
        "title": "Rates", "base": PAPER, "full_epochs": 100, "out": "results/lr",
        "overrides": ["train.epochs=3", "data.limit_train=150", "data.val_size=50"],
        "grid": {"quant.method": ["fp", "b158"], "train.lr": [0.001, 0.003],
                 "train.seed": [0, 1]}}))
    sweep = load_sweep(sweep_path)
    val = {("fp", 0.001): 0.5, ("fp", 0.003): 0.4, ("b158", 0.001): 0.4, ("b158", 0.003): 0.6}
    names = list(sweep.run_dirs().items())
    for name, point in names[:-1]:  # the last planned run is not there yet
        v = val[point["quant.method"], point["train.lr"]]
        lr_run(tmp_path / "results/lr" / name, point_overrides(point), v, v, point["train.seed"])
    text = write_report("results", "studies").read_text()
    assert "### Learning rate per method (chosen on validation)" in text
    assert "Validation split: 50 of those images held out (data.val_size)" in text
    assert "Missing or unfinished: b158 at lr=0.003: seeds 1." in text
    assert "Not all runs finished: no verdict yet." in text
    assert "![validation accuracy against learning rate](lr/lr.png)" in text
    assert (tmp_path / "results/lr/lr.png").is_file()
    assert "| fp | 0, 1 |" not in text  # the comparison groups by rate too
    # The last run arrives: a verdict.
    name, point = names[-1]
    lr_run(tmp_path / "results/lr" / name, point_overrides(point), 0.6, 0.6, 1)
    text = write_report("results", "studies").read_text()
    assert "| b158 | 40.05 ± 0.07 | 60.05 ± 0.07 | 0.003 | 60.05 ± 0.07 | 40.05 ± 0.07 |" in text
    assert ("The ranking at per-method rates differs from the ranking at lr=0.001: b158 > fp "
            "(at 0.001: fp > b158).") in text


def test_planned_auto_normalization_matches_the_numbers_a_run_recorded(tmp_path):
    # A sweep plans data.mean/std: auto; its runs record the numbers auto resolved to. Both are
    # one method, not two (the report once listed "fp mean=auto" beside "fp mean=0.49...").
    table = {"fp": {0.0003: (0.45, 0.45), 0.001: (0.50, 0.50)}}
    runs = grid(tmp_path, table)
    planned = []
    for r in runs:
        config = yaml.safe_load(yaml.safe_dump(r.config))
        assert config["data"]["mean"] == "auto"  # fake runs keep the preset's auto ...
        config["data"]["mean"] = [0.4914, 0.4822, 0.4465]  # ... the plan has numbers, or back
        config["data"]["std"] = [0.247, 0.2435, 0.2616]
        planned.append(config)
    choice = choose_rates(runs, last_k=2, planned=planned)
    assert choice.complete and [m.label for m in choice.methods] == ["fp"]
    assert choice.method("fp").chosen == 0.001


def test_a_method_without_the_reference_rate_gives_no_ranking_and_no_error(tmp_path):
    runs = grid(tmp_path, {
        "fp": {0.0003: (0.46, 0.45), 0.001: (0.48, 0.47)},
        "b158": {0.0003: (0.49, 0.48), 0.003: (0.47, 0.46)},  # never at the reference 1e-3
    })
    choice = choose_rates(runs, last_k=2, planned=[r.config for r in runs])
    assert choice.complete and choice.ranking_chosen == []
    assert {m.label: m.chosen for m in choice.methods} == {"fp": 0.001, "b158": 0.0003}
    rates_markdown(choice, runs)  # renders: no KeyError


def test_a_rate_planned_for_one_method_only_leaves_the_others_complete(tmp_path):
    # fp's best rate was the grid's lowest, so it alone got a lower one (as lr-cpu did).
    runs = grid(tmp_path, {
        "fp": {0.0001: (0.46, 0.45), 0.0003: (0.48, 0.47), 0.001: (0.45, 0.44)},
        "b158": {0.0003: (0.49, 0.48), 0.001: (0.47, 0.46)},
    })
    choice = choose_rates(runs, last_k=2, planned=[r.config for r in runs])
    assert choice.complete and not choice.missing()
    assert {m.label: m.chosen for m in choice.methods} == {"fp": 0.0003, "b158": 0.0003}
    assert list(choice.method("b158").cells) == [0.0003, 0.001]
    text = rates_markdown(choice, runs)
    assert "| b158 | n/a | 49.10 ± 0.10 | 47.10 ± 0.10 | 0.0003 | 48.10 ± 0.10 |" in text
    # fp's rate is interior to its grid; b158's is its grid's lowest, and the verdict says so.
    assert verdict(choice).endswith("Chosen at the edge of the method's own grid, so its best "
                                    "rate may lie beyond it: b158 (0.0003).")
