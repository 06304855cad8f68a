"""Edited or damaged run folders and sweep outputs: `bitvit compare` and `bitvit report` give one
line naming the file (exit 2), or n/a in the tables, never a traceback or unbounded memory."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error
from test_studies import PAPER, fake_run

from bitvit.files import MAX_TEXT_BYTES
from bitvit.studies.report import compare, compare_groups, turning_markdown, write_report
from bitvit.studies.runs import group_runs, load_run
from bitvit.studies.stats import last_k_mean, positive_p_value, summarize, welch_difference
from bitvit.studies.sweep import SweepError

NAN, INF = math.nan, math.inf


def _edit_config(run: Path, edit) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    edit(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


# --- config.yaml: checked as any config is ------------------------------------------------------


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c["train"].update(epochs="abc"), "train.epochs='abc'"),
    (lambda c: c["train"].update(epochs=INF), "train.epochs=inf"),
    (lambda c: c.update(train=[1, 2]), "section 'train' must be a mapping"),
    (lambda c: c.update(quant="x"), "section 'quant' must be a mapping"),
    (lambda c: c["quant"].update(method="bogus"), "quant.method='bogus'"),
])
def test_a_bad_config_value_is_one_line_naming_the_file(tmp_path, capsys, edit, expected):
    run = fake_run(tmp_path / "r", [], [0.3, 0.4])
    _edit_config(run, edit)
    err = one_line_error(capsys, "compare", str(run))
    assert f"{run / 'config.yaml'}: " in err and expected in err


def test_an_empty_section_reads_as_the_defaults(tmp_path):
    run = fake_run(tmp_path / "r", [], [0.3, 0.4])
    _edit_config(run, lambda c: c.update(data=None))
    assert load_run(run).config["data"] == {}


# --- metrics.csv: the columns the tables read ---------------------------------------------------


def test_metrics_without_test_acc_is_one_line_naming_file_and_column(tmp_path, capsys):
    run = fake_run(tmp_path / "r", [], [0.3, 0.4])
    (run / "metrics.csv").write_text("epoch,foo\n1,2\n")
    err = one_line_error(capsys, "compare", str(run))
    assert f"{run / 'metrics.csv'}: no train_loss, test_acc, test_loss and train_acc" in err
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,test_loss,test_acc\n"
                                     "1,2,0.1,2,0.1\n")
    assert load_run(run).rows  # every column the tables need
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,test_loss\n1,2,0.1,2\n")
    with pytest.raises(SweepError, match="metrics.csv: no test_acc column;"):
        load_run(run)


# --- run.json: a field of the wrong type is treated as missing ----------------------------------


@pytest.mark.parametrize("fields", [
    {"resumed_from": 5},
    {"resumed_from": ["a", "b"]},
    {"resumed_from": [{"wall_seconds": 5.0}, "a", {"wall_seconds": "x"}]},
    {"wall_seconds": "abc"},
    {"wall_seconds": True},
    {"wall_seconds": 10**400},
    {"wall_seconds": -5},
    {"status": ["finished"], "device": {"a": 1}},
])
def test_a_bad_run_json_field_is_treated_as_missing(tmp_path, capsys, fields):
    run = fake_run(tmp_path / "r", [], [0.3, 0.4])
    info = json.loads((run / "run.json").read_text()) | fields
    (run / "run.json").write_text(json.dumps(info))
    loaded = load_run(run)
    assert loaded.epoch_seconds == 20.0  # the table's time: metrics.csv's, whatever run.json says
    assert loaded.finished == ("status" not in fields)
    assert main_ok(capsys, "compare", str(run), "--include-unfinished")


def main_ok(capsys, *argv: str) -> bool:
    from bitvit.cli import main

    capsys.readouterr()
    code = main(list(argv))
    assert capsys.readouterr().err == ""
    return code == 0


# --- statistics of non-finite and huge values: n/a, never an exception -------------------------


def test_statistics_of_nan_inf_and_huge_values():
    assert math.isnan(summarize([1.0, NAN]).mean) and summarize([1.0, NAN]).n == 2
    assert math.isnan(summarize([1e308, 1e308, -1e308]).std)
    assert last_k_mean([1e308, 1e308], 2) == 1e308  # fsum's intermediate overflow
    assert math.isnan(last_k_mean([INF, -INF], 2)) and math.isnan(last_k_mean([NAN, 1.0], 2))
    assert last_k_mean([NAN, 1.0, 2.0], 2) == 1.5  # outside the window: no matter
    d = welch_difference([0.5, NAN], [0.4, 0.5], 0.01)
    assert not d.available and "not finite" in d.reason and d.verdict == "n/a"
    huge = welch_difference([1e308, -1e308, 1e308], [1e308, 1e308], 0.01)
    assert not huge.available and "too large" in huge.reason
    assert 0 <= positive_p_value([INF, 0.1, 0.2, 0.15]) <= 1
    assert math.isnan(positive_p_value([1e308, -1e308, 1e308]))


def _study(root: Path, test_acc: list[float], test_loss: list[float]) -> Path:
    for method in ("fp", "b158"):
        for seed in (0, 1):
            fake_run(root / f"{method}_{seed}", [f"quant.method={method}", f"train.seed={seed}"],
                     test_acc, test_loss=test_loss)
    return root


@pytest.mark.parametrize(("test_acc", "test_loss"), [
    ([NAN] * 8, [NAN, INF, NAN, -INF, NAN, NAN, INF, NAN]),  # every loss non-finite
    ([0.1, 0.2, 0.3, NAN, 0.4, 0.4, 0.5, INF], [2.0, 1.8, INF, 1.5, 1.4, NAN, 1.3, 1.3]),
    ([1e308, -1e308, 1e308, 1e308, 1e308, 1.7e308, 1e308, 1e308], [1e308, -1e308] * 4),
])
def test_compare_of_non_finite_or_huge_metrics_gives_n_a(tmp_path, test_acc, test_loss):
    study = _study(tmp_path / "s", test_acc, test_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning line: numpy's, matplotlib's
        _, text = compare([study], out=tmp_path / "out")
    assert (tmp_path / "out/compare.md").read_text() == text
    assert "n/a" in text and max(map(len, text.splitlines())) < 3000  # no 300-digit numbers


def test_turning_point_table_leaves_out_runs_without_a_finite_loss(tmp_path):
    study = _study(tmp_path / "s", [0.1] * 7, [NAN] * 7)
    groups = compare_groups(group_runs([load_run(p) for p in sorted(study.iterdir())]))
    lines = turning_markdown(groups, 5)
    assert "| fp | 0 | n/a | n/a | n/a | n/a | n/a | n/a |" in lines


# --- report: commands.txt read within a limit ---------------------------------------------------


def _results_tree(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies/one.yaml").write_text(yaml.safe_dump({
        "title": "Study one", "base": PAPER, "out": "results/one",
        "grid": {"train.seed": [0]}}))
    (tmp_path / "results/one").mkdir(parents=True)
    return tmp_path / "results/one/commands.txt"


def test_report_refuses_an_oversized_commands_file(tmp_path, monkeypatch, capsys):
    commands = _results_tree(tmp_path, monkeypatch)
    with commands.open("wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: no disk, and never read whole
    err = one_line_error(capsys, "report", "--results", "results", "--studies", "studies")
    assert "results/one/commands.txt: " in err and "at most" in err
    assert not (tmp_path / "results/README.md").exists()


def test_report_refuses_a_fifo_or_binary_commands_file(tmp_path, monkeypatch, capsys):
    commands = _results_tree(tmp_path, monkeypatch)
    os.mkfifo(commands)  # opening it must not wait for a writer
    err = one_line_error(capsys, "report", "--results", "results", "--studies", "studies")
    assert "results/one/commands.txt: not a regular file (a pipe)" in err
    commands.unlink()
    commands.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SweepError, match="commands.txt: not a text file"):
        write_report("results", "studies")
    commands.write_text("bitvit sweep studies/one.yaml\n")
    assert "bitvit sweep studies/one.yaml\n" in write_report("results", "studies").read_text()
