"""The comparison figures with unfinished runs: drawn apart and marked, counted in the title; the
empty case keeps its units. Asserts on what the figures draw (lines, labels, texts), not pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_studies import fake_run, figure_text, study2

from bitvit.studies.figures import UNFINISHED_STYLE, plot_dots, plot_groups
from bitvit.studies.report import compare, compare_groups
from bitvit.studies.runs import find_run_dirs, group_runs, load_run


def groups_of(folder: Path):
    return compare_groups(group_runs([load_run(p) for p in find_run_dirs([folder])]))


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_unfinished_runs_are_drawn_apart_and_counted(tmp_path):
    """fp: two finished seeds and one unfinished; b158: only unfinished runs, 2 and 3 of 4."""
    out = tmp_path / "study"
    fake_run(out / "fp_seed=0", ["train.seed=0"], [0.30, 0.40, 0.50, 0.60])
    fake_run(out / "fp_seed=1", ["train.seed=1"], [0.32, 0.42, 0.52, 0.62])
    fake_run(out / "fp_seed=2", ["train.seed=2"], [0.9], status="running", epochs=4)
    fake_run(out / "b158_seed=0", ["quant.method=b158", "train.seed=0"], [0.20, 0.30],
             status="interrupted", epochs=4)
    fake_run(out / "b158_seed=1", ["quant.method=b158", "train.seed=1"], [0.22, 0.34, 0.40],
             status="running", epochs=4, device="cuda (H100)")
    fig = plot_groups(groups_of(out), tmp_path / "a.png", "Study", full_epochs=4)
    assert (tmp_path / "a.png").stat().st_size > 10_000

    acc = lines_by_label(fig.axes[0])
    assert set(acc) == {f"{g}, {split}" for split in ("train", "test") for g in (
        "fp (n=2)", "fp, unfinished (1 of 4 epochs)", "b158, unfinished (2 and 3 of 4 epochs)")}
    # Finished runs keep their whole curve; the unfinished fp run neither shortens nor moves it.
    finished = acc["fp (n=2), test"]
    assert list(finished.get_ydata()) == pytest.approx([31, 41, 51, 61])
    assert finished.get_marker() in ("None", "none", None)
    # Unfinished: the mean over the epochs all of the group's unfinished runs have, in %.
    b158 = acc["b158, unfinished (2 and 3 of 4 epochs), test"]
    assert list(b158.get_xdata()) == [1, 2]
    assert list(b158.get_ydata()) == pytest.approx([21, 32])
    assert list(acc["fp, unfinished (1 of 4 epochs), test"].get_ydata()) == pytest.approx([90])
    assert b158.get_marker() == UNFINISHED_STYLE["marker"]
    assert b158.get_linewidth() < finished.get_linewidth()
    assert b158.get_color() == acc["b158, unfinished (2 and 3 of 4 epochs), train"].get_color()
    # Bands: fp's finished seeds and b158's two unfinished ones, train and test each.
    assert len(fig.axes[0].collections) == 4

    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["fp (n=2)", "fp, unfinished (1 of 4 epochs)",
                          "b158, unfinished (2 and 3 of 4 epochs)"]
    lines = figure_text(fig).splitlines()
    assert lines[:4] == [
        "Study", "device: cpu (test, 2 threads); cuda (H100); 4 of 4 epochs",
        "training images: full training set; test images: full test set",
        "3 runs unfinished: 1, 2 and 3 of 4 epochs; drawn thin, a dot per epoch"]


def test_only_unfinished_runs_draw_curves_and_no_dot_plot(tmp_path):
    out = tmp_path / "study"
    fake_run(out / "fp_seed=0", ["data.limit_train=40"], [0.30, 0.40], status="running",
             epochs=100, device="cuda (H100)")
    fake_run(out / "b158_seed=0", ["quant.method=b158", "data.limit_train=40"],
             [0.20, 0.30, 0.35], status="interrupted", epochs=100, device="cuda (H100)")
    groups = groups_of(out)
    fig = plot_groups(groups, tmp_path / "a.png", "Long study", full_epochs=100)
    acc = lines_by_label(fig.axes[0])
    assert list(acc["fp, unfinished (2 of 100 epochs), train"].get_ydata()) == pytest.approx(
        [40, 50])
    assert list(acc["b158, unfinished (3 of 100 epochs), test"].get_ydata()) == pytest.approx(
        [20, 30, 35])
    assert len(acc) == 4
    # Device and data size from the unfinished runs; no "0 of 100 epochs", no blank line.
    assert figure_text(fig).splitlines()[:4] == [
        "Long study", "device: cuda (H100); no finished run yet",
        "training images: 40 (class-balanced subset); test images: full test set",
        "2 runs unfinished: 2 and 3 of 100 epochs; drawn thin, a dot per epoch"]

    # Nothing to rank: no dot plot (and none left over from an earlier report), and the
    # Markdown says so instead of linking it.
    assert plot_dots(groups, tmp_path / "dots.png") is None
    assert not (tmp_path / "dots.png").exists()
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp/compare-dots.png").write_bytes(b"stale")
    _, md = compare([out], out=tmp_path / "cmp", full_epochs=100)
    assert (tmp_path / "cmp/compare.png").is_file()
    assert not (tmp_path / "cmp/compare-dots.png").exists()
    assert "compare-dots.png" not in md
    assert "No dot plot of every seed's test accuracy yet" in md
    assert "![loss and accuracy per epoch](compare.png)" in md


def test_no_epoch_yet_keeps_percent_axis_and_no_blank_lines(tmp_path):
    fake_run(tmp_path / "run", [], [], status="running", epochs=100)
    fig = plot_groups(groups_of(tmp_path / "run"), tmp_path / "a.png", "Long study",
                      full_epochs=100)
    assert fig.axes[0].get_ylabel() == "accuracy (%)"
    assert fig.axes[0].get_ylim() == (0, 100) and not fig.axes[0].get_lines()
    assert "no epoch done yet" in [t.get_text() for t in fig.axes[0].texts]
    text = figure_text(fig)
    assert "1 run unfinished: 0 of 100 epochs\n" in text and "drawn thin" not in text
    assert "device: cpu (test, 2 threads); no finished run yet" in text

    # No runs at all: no empty "training images: ; test images:" line either.
    text = figure_text(plot_groups([], tmp_path / "b.png", "Nothing"))
    assert "training images" not in text and "\n\n" not in text
    assert text.splitlines()[:2] == ["Nothing", "device: none; no runs"]


def test_small_multiples_draw_unfinished_runs_too(tmp_path):
    out = study2(tmp_path)
    fake_run(out / "b158_seed=2", ["quant.method=b158", "train.seed=2", "data.limit_train=40"],
             [0.1, 0.3], status="interrupted", epochs=3)
    fig = plot_groups(groups_of(out), tmp_path / "many.png", "Study two", full_epochs=100)
    assert fig.axes[0].get_title() == "fp, b158"  # the small multiples
    acc = lines_by_label(fig.axes[0])
    unfinished = acc["b158 all act8, unfinished (2 of 3 epochs)"]
    assert list(unfinished.get_ydata()) == pytest.approx([10, 30])
    assert unfinished.get_marker() == UNFINISHED_STYLE["marker"]
    assert list(acc["b158 all act8 (n=2)"].get_ydata()) == pytest.approx([10, 39.5, 40.5])
    assert "1 run unfinished: 2 of 3 epochs (a shortened budget of 100); drawn thin, a dot " \
        "per epoch" in figure_text(fig)


def test_a_distilled_groups_train_loss_is_not_drawn_beside_cross_entropy(tmp_path):
    """A student's train_loss is its distillation objective: on the loss axis only its test
    loss is drawn, and the title says why; its twin keeps both curves."""
    out = tmp_path / "study"
    kd = ["quant.method=b158", f"train.distill.teacher={tmp_path / 'teacher'}",
          f"train.distill.teacher_sha256={'ab' * 32}", "train.distill.teacher_test_acc=0.5"]
    for seed in (0, 1):
        fake_run(out / f"b158_seed={seed}", ["quant.method=b158", f"train.seed={seed}"],
                 [0.3, 0.4])
        fake_run(out / f"kd_seed={seed}", [*kd, f"train.seed={seed}"], [0.35, 0.45])
    fig = plot_groups(groups_of(out), tmp_path / "a.png", "Distillation")
    loss, acc = lines_by_label(fig.axes[1]), lines_by_label(fig.axes[0])
    [student] = [label[:-len(", test")] for label in loss if "kd=" in label]
    assert f"{student}, test" in loss and f"{student}, train" not in loss
    assert f"{student}, train" in acc  # its accuracy on the labels is comparable
    assert {"b158 (n=2), train", "b158 (n=2), test"} <= set(loss)
    assert "a distilled group's running train loss (its distillation objective" in \
        figure_text(fig)


def test_the_train_accuracy_drawn_is_the_one_the_tables_compare(tmp_path):
    """Runs that record eval-mode train accuracy draw it, not the running train-mode average."""
    import csv

    out = tmp_path / "study"
    for seed in (0, 1):
        run = fake_run(out / f"fp_seed={seed}", [f"train.seed={seed}"], [0.3, 0.4])
        with (run / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["train_eval_loss"], row["train_eval_acc"] = "1.0", "0.9"
        with (run / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    fig = plot_groups(groups_of(out), tmp_path / "a.png", "Study")
    acc, loss = lines_by_label(fig.axes[0]), lines_by_label(fig.axes[1])
    assert list(acc["fp (n=2), train"].get_ydata()) == pytest.approx([90, 90])
    assert list(loss["fp (n=2), train"].get_ydata()) == pytest.approx([1.0, 1.0])  # its loss
    assert "accuracy and loss in eval mode where every run recorded them" in figure_text(fig)


def test_both_figures_color_each_group_alike(tmp_path):
    """compare.png and compare-dots.png: full precision black, each method its own color, the
    same in both (the dot plot sorts groups by their mean, which must not reorder colors)."""
    from matplotlib.colors import to_hex

    out = tmp_path / "study"
    for method, base in (("fp", 0.30), ("b158", 0.50), ("bitnet", 0.40)):
        for seed in (0, 1):
            fake_run(out / f"{method}_seed={seed}",
                     [f"quant.method={method}", f"train.seed={seed}"],
                     [base + 0.01 * seed, base + 0.1 + 0.01 * seed])
    groups = groups_of(out)
    curves = lines_by_label(plot_groups(groups, tmp_path / "a.png").axes[0])
    dots = plot_dots(groups, tmp_path / "dots.png").axes[0]
    dot_colors = {tick.get_text().split(" (")[0]: to_hex(c.get_facecolor()[0])
                  for tick, c in zip(dots.get_yticklabels(), dots.collections, strict=True)}
    line_colors = {g: to_hex(curves[f"{g} (n=2), test"].get_color())
                   for g in ("fp", "b158", "bitnet")}
    assert line_colors == dot_colors and line_colors["fp"] == "#000000"
    assert len(set(line_colors.values())) == 3
