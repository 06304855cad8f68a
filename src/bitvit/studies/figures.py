"""The figures of a comparison, titled with where and how long the runs trained and on how many
images. matplotlib is imported only when a figure is drawn.

- `plot_groups` (compare.png): accuracy (%) and loss per epoch. Up to `FEW_GROUPS` groups share
  one pair of panels; more get small multiples, one column per quantization method. Unfinished
  runs are drawn too, thin with a dot per epoch, labelled with their epochs done, so that a
  long study shows its progress without passing it off as a result.
- `plot_dots` (compare-dots.png): every seed's headline test accuracy per group, groups sorted
  by their mean, fp's mean as a reference line; drawn for every comparison with a run in its
  statistics, so that each table has its ranking beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitvit.studies.runs import (
    Group,
    Run,
    data_size,
    epochs_done,
    provenance,
    train_acc_column,
    unfinished_line,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FEW_GROUPS = 4  # up to this many groups share one pair of panels
BAND = "band: min-max over seeds"


def _save(fig: Any, path: str | Path, dpi: int) -> None:
    """Write a figure atomically, so a full disk never leaves half a PNG behind."""
    from bitvit import files

    files.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _suptitle(fig: Figure, runs: list[Run], title: str, full_epochs: int | None,
              *notes: str, unfinished: list[Run] | None = None) -> None:
    """Title, provenance, data size (of finished and unfinished runs), the unfinished runs'
    progress, then ``notes``; empty lines left out."""
    unfinished = unfinished or []
    lines = [title, provenance(runs, full_epochs, unfinished), data_size([*runs, *unfinished]),
             unfinished_line(unfinished, full_epochs), *notes]
    fig.suptitle("\n".join(line for line in lines if line), fontsize=10)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(runs: list[Run], column: str) -> tuple[Any, Any]:
    """Epochs and a (seeds, epochs) array of ``column`` over the epochs every run has;
    accuracies in %."""
    import numpy as np

    n = min(len(r.rows) for r in runs)
    scale = 100.0 if column.endswith("_acc") else 1.0
    values = np.array([[scale * row[column] for row in r.rows[:n]] for r in runs])
    # nan, inf (a diverged run, an edited file) or 1e308 past the scale: a gap in the curve,
    # not an axis matplotlib cannot scale.
    return np.arange(1, n + 1), _drawable(values)


def _drawable(values: Any) -> Any:
    """``values`` with the non-finite and the absurdly large (beyond 1e300) as nan: matplotlib
    leaves them out of a curve, where an inf or a 1e308 would break the axis's scale."""
    import numpy as np

    with np.errstate(all="ignore"):
        return np.where(np.isfinite(values) & (np.abs(values) < 1e300), values, np.nan)


def _draw(ax: Any, runs: list[Run], column: str, band: bool = True, **style: Any) -> Any:
    """The mean over seeds, with the min-max band when ``band`` and there are several seeds."""
    import numpy as np

    epochs, values = _curves(runs, column)
    with np.errstate(all="ignore"):  # an epoch with a nan is a gap, quietly
        (line,) = ax.plot(epochs, _drawable(values.mean(0)), **style)
        if band and len(runs) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(),
                            alpha=0.13, linewidth=0)
    return line


def _finish_axes(ax: Any, ylabel: str | None, xlabel: bool = True) -> None:
    if xlabel:
        ax.set_xlabel("epoch")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if not ax.get_lines():
        # Nothing to draw: the axis in its units (an accuracy in %, 0-100), not matplotlib's 0-1.
        if ylabel and "(%)" in ylabel:
            ax.set_ylim(0, 100)
        ax.text(0.5, 0.5, "no epoch done yet", transform=ax.transAxes, ha="center",
                va="center", color="gray")


def _used(g: Group) -> list[Run]:
    """The runs of the group's statistics that have epochs (the dot plot's)."""
    return [r for r in g.runs if r.rows]


def _finished(g: Group) -> list[Run]:
    """The runs drawn as results: those of the statistics that are not unfinished."""
    return [r for r in _used(g) if not any(r is u for u in g.unfinished)]


def _unfinished(g: Group) -> list[Run]:
    """The unfinished runs with at least one epoch: drawn thin, a dot per epoch."""
    return [r for r in g.unfinished if r.rows]


# Unfinished runs: thin, pale, a dot per epoch, so that they never pass for finished results.
UNFINISHED_STYLE = {"linewidth": 0.9, "alpha": 0.6, "marker": ".", "markersize": 4}


def unfinished_label(g: Group) -> str:
    """e.g. ``b158, unfinished (5 and 7 of 100 epochs)``; the curve is their mean over the
    epochs all of them have."""
    return f"{g.label}, unfinished ({epochs_done(_unfinished(g))})"


def _drawn(groups: list[Group]) -> list[Group]:
    """The groups with a curve: finished or unfinished runs with epochs."""
    return [g for g in groups if _finished(g) or _unfinished(g)]


def _few_group_colors(groups: list[Group]) -> dict[str, str]:
    """A color per group label, as `plot_dots` colors methods: a lone full-precision group
    black, the others the palette's colors in the groups' order."""
    palette = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    lone_fp = sum(g.is_fp for g in groups) == 1
    others = [g.label for g in groups if not (lone_fp and g.is_fp)]
    return {g.label: "black" if g.label not in others else
            palette[others.index(g.label) % len(palette)] for g in groups}


def _all_unfinished(groups: list[Group]) -> list[Run]:
    return [r for g in groups for r in g.unfinished]


def plot_groups(groups: list[Group], path: str | Path, title: str = "",
                full_epochs: int | None = None) -> Figure:
    """Test accuracy (%) and loss per epoch per group: the mean over seeds with a min-max band,
    over the epochs every run of the group has; a group's unfinished runs likewise, apart, thin,
    with a dot per epoch (`UNFINISHED_STYLE`). Up to `FEW_GROUPS` groups in one pair of panels
    (train solid, test dashed); more in small multiples (`plot_panels`). The title says on what
    device the runs trained, their budget (of ``full_epochs`` when given), how far unfinished
    runs are and how many images. Returns the (closed) matplotlib Figure."""
    shown = _drawn(groups)
    if len(shown) > FEW_GROUPS:
        return plot_panels(groups, path, title, full_epochs)
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = _few_group_colors(shown)
    handles = []
    for g in shown:  # at most FEW_GROUPS
        color = colors[g.label]
        for runs, style, label in ((_finished(g), {}, f"{g.label} (n={len(_finished(g))})"),
                                   (_unfinished(g), UNFINISHED_STYLE, unfinished_label(g))):
            if not runs:
                continue
            for ax, metric in ((ax_acc, "acc"), (ax_loss, "loss")):
                for split, dash in (("train", "-"), ("test", "--")):
                    column = _column(runs, f"{split}_{metric}")
                    if column == "train_loss" and _distilled(g):
                        continue
                    _draw(ax, runs, column, color=color, linestyle=dash,
                          label=f"{label}, {split}", **style)
            handles.append(Line2D([], [], color=color, label=label, **style))
    _finish_axes(ax_acc, "accuracy (%)")
    _finish_axes(ax_loss, "loss")
    handles += [Line2D([], [], color="gray", linestyle="-", label="train"),
                Line2D([], [], color="gray", linestyle="--", label="test")]
    # Below the panels, so that the entries never cover the curves.
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=9,
               frameon=False)
    distilled = ("; a distilled group's running train loss (its distillation objective, not "
                 "cross-entropy) is not drawn" if any(
                     _distilled(g) and _column(_finished(g) + _unfinished(g), "train_loss")
                     == "train_loss" for g in shown) else "")
    _suptitle(fig, [r for g in shown for r in _finished(g)], title, full_epochs,
              f"mean over seeds, {BAND}; train solid (accuracy and loss in eval mode where every "
              f"run recorded them, as in the tables), test dashed{distilled}",
              unfinished=_all_unfinished(groups))
    rows = -(-len(handles) // min(6, len(handles)))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    _save(fig, path, 120)
    plt.close(fig)
    return fig


def _column(runs: list[Run], column: str) -> str:
    """The train accuracy the tables compare (`train_acc_column`), and the loss beside it: eval
    mode on a fixed subset where every run recorded it, not the running train-mode average (nor,
    for a distilled run, its distillation objective)."""
    if column in ("train_acc", "train_loss") and all(
            train_acc_column(r) == "train_eval_acc" for r in runs):
        return column.replace("train_", "train_eval_")
    return column


def _distilled(g: Group) -> bool:
    """Whether the group's runs learned from a teacher: their train_loss is the distillation
    objective (with its T^2-scaled KL term), on no common axis with cross-entropy."""
    return g.key.get("train.distill.teacher_sha256") is not None


def _method(g: Group) -> str:
    return str(g.key.get("quant.method", "runs"))


def _rest(g: Group) -> str:
    """The group's label without its method, e.g. ``attn act1`` for ``xnor attn act1``."""
    words = g.label.split()
    return " ".join(words[1:]) if words and words[0] == _method(g) else g.label


def _panels(groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """One panel per method; methods with a single group (fp and b158 in study 2) share one
    panel, named after them, so that no panel holds a lone line."""
    by_method: dict[str, list[Group]] = {}
    for g in groups:
        by_method.setdefault(_method(g), []).append(g)
    lone = [gs[0] for gs in by_method.values() if len(gs) == 1]
    panels = [(m, gs) for m, gs in by_method.items() if len(gs) > 1]
    if lone:
        panels.insert(0, (", ".join(_method(g) for g in lone), lone))
    return panels


LINESTYLES = ["-", "--", ":", "-."]


def _styles(groups: list[Group]) -> dict[str, dict[str, Any]]:
    """A line style per group label, the same across panels: the color says the placement (the
    label's words other than the method and activation bits, e.g. ``attn``), the dash the
    activation bits (``act1``); a lone full-precision group is black."""
    plt = _pyplot()

    def split(g: Group) -> tuple[str, str]:
        words = _rest(g).split()
        act = [w for w in words if w.startswith("act")]
        return " ".join(w for w in words if not w.startswith("act")), " ".join(act)

    black = [g for g in groups if g.is_fp][:2]
    black = black if len(black) == 1 else []  # several fp groups need telling apart
    places = sorted({split(g)[0] for g in groups if g not in black})
    acts = sorted({split(g)[1] for g in groups if g not in black},
                  key=lambda a: (a != "act-fp", a))  # unquantized activations solid
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {}
    for g in groups:
        place, act = split(g)
        styles[g.label] = ({"color": "black", "linestyle": "-"} if g in black else
                           {"color": colors[places.index(place) % len(colors)],
                            "linestyle": LINESTYLES[acts.index(act) % len(LINESTYLES)]})
    return styles


def plot_panels(groups: list[Group], path: str | Path, title: str = "",
                full_epochs: int | None = None) -> Figure:
    """Small multiples: a column per method (`_panels`), test accuracy (%) above, test loss
    below, y axes shared along each row so that columns compare; each group the mean over seeds
    with a min-max band, full precision's mean drawn faintly (thick, pale, in the color of its
    placement) in every column it is not in; unfinished runs in their group's style, thin, with
    a dot per epoch (`UNFINISHED_STYLE`)."""
    plt = _pyplot()
    shown = _drawn(groups)
    panels = _panels(shown)
    styles = _styles(shown)
    fps = [g for g in shown if g.is_fp]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels) + 0.6, 9.2),
                             sharex=True, sharey="row", squeeze=False, layout="constrained")
    for col, (name, members) in enumerate(panels):
        ax_acc, ax_loss = axes[0, col], axes[1, col]
        shared = len({_method(g) for g in members}) > 1
        for g in members:
            name_in_panel = g.label if shared else _rest(g)
            drawn = [(_finished(g), {"linewidth": 1.8}, f"{name_in_panel} (n={len(_finished(g))})"),
                     (_unfinished(g), UNFINISHED_STYLE,
                      f"{name_in_panel}, unfinished ({epochs_done(_unfinished(g))})")]
            for runs, style, label in drawn:
                for ax, column in ((ax_acc, "test_acc"), (ax_loss, "test_loss")):
                    if runs:
                        _draw(ax, runs, column, label=label, **style, **styles[g.label])
        for ref in (f for f in fps if f not in members and _finished(f)):
            for ax, column in ((ax_acc, "test_acc"), (ax_loss, "test_loss")):
                _draw(ax, _finished(ref), column, band=False, color=styles[ref.label]["color"],
                      alpha=0.3, linewidth=3, label=f"{ref.label} mean (reference)")
        ax_acc.set_title(name, fontsize=12, fontweight="bold")
        _finish_axes(ax_acc, "test accuracy (%)" if col == 0 else None, xlabel=False)
        _finish_axes(ax_loss, "test loss" if col == 0 else None)
        # Each column's legend below it: the curves stay uncovered. Two columns of entries
        # only while they fit the panel's width (distilled students' labels are long).
        longest = max((len(t) for t in ax_loss.get_legend_handles_labels()[1]), default=0)
        ax_loss.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16),
                       ncol=2 if longest <= 24 else 1, fontsize=9, frameon=False)
    _suptitle(fig, [r for g in groups for r in _finished(g)], title, full_epochs,
              f"test set, mean over seeds, {BAND}", unfinished=_all_unfinished(groups))
    _save(fig, path, 110)
    plt.close(fig)
    return fig


def _dot_mean(values: list[float]) -> float:
    """The mean of a group's dots; nan where one is not finite or the mean would not be (or
    would not fit an axis: beyond 1e300)."""
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    mean = sum(values) / len(values)
    return mean if math.isfinite(mean) and abs(mean) < 1e300 else math.nan


def _finite_or_low(mean: float) -> tuple[bool, float]:
    """A sort key: groups with a mean by it, those without one (nan) first, at the bottom."""
    return (not math.isnan(mean), 0.0 if math.isnan(mean) else mean)


def plot_dots(groups: list[Group], path: str | Path, title: str = "",
              full_epochs: int | None = None, last_k: int = 5) -> Figure | None:
    """Every seed's headline test accuracy (%), the mean of its last ``last_k`` epochs, as a
    dot per seed in a row per group, groups sorted by their mean (best on top), the mean a
    vertical bar (its value on the right), full precision's mean a dashed vertical line. The
    dots of one group are one scatter collection. Returns the (closed) matplotlib Figure, or
    None, writing nothing, while no group has a run in its statistics (an empty ranking would
    only look broken; compare.md says why it is missing)."""
    # Groups without a finite mean (a diverged run) go to the bottom, their mean n/a.
    shown = sorted((g for g in groups if _used(g)),
                   key=lambda g: _finite_or_low(_dot_mean(g.values("last_test_acc", last_k))))
    if not shown:
        return None
    plt = _pyplot()
    # A color per method (fp black): the ranking of methods shows at a glance. Methods in the
    # groups' order, so that a study of one group per method colors them as compare.png does.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(_method(g) for g in groups if _used(g) and not g.is_fp))
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.36 * len(shown)))
    means = []
    for y, g in enumerate(shown):
        values = [100 * v for v in g.values("last_test_acc", last_k)]
        means.append(_dot_mean(values))
        values = [v for v in values if math.isfinite(v) and abs(v) < 1e300]  # drawable dots
        # Seeds side by side vertically, so that equal values stay countable.
        offsets = [0.22 * (i - (len(values) - 1) / 2) / max(1, len(values) - 1)
                   for i in range(len(values))]
        color = "black" if g.is_fp else palette[methods.index(_method(g)) % len(palette)]
        ax.scatter(values, [y + o for o in offsets], s=30, color=color, alpha=0.85, zorder=3)
        ax.plot([means[-1]] * 2, [y - 0.32, y + 0.32], color=color, linewidth=2.5, zorder=2)
    for i, ref in enumerate(g for g in shown if g.is_fp):
        fp_mean = means[shown.index(ref)]
        if math.isnan(fp_mean):
            continue
        ax.axvline(fp_mean, color="black", linestyle=LINESTYLES[1:][i % 3], alpha=0.5,
                   linewidth=1, label=f"{ref.label} mean {fp_mean:.1f}%")
    ax.set_yticks(range(len(shown)), [f"{g.label} (n={len(_used(g))})" for g in shown])
    ax.set_ylim(-0.6, len(shown) - 0.4)
    # The means as the right-hand tick labels: readable, never on top of a dot.
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(range(len(shown)), ["n/a" if math.isnan(m) else f"{m:.1f}" for m in means])
    right.set_ylabel("mean (%)")
    ax.set_xlabel(f"test accuracy (%), mean of the last {last_k} epochs of each run")
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # fp's line, unless its mean is n/a
        ax.legend(loc="lower right", fontsize=8)
    _suptitle(fig, [r for g in shown for r in _used(g)], title, full_epochs,
              "a dot per seed; bar and right-hand number: the group's mean")
    fig.tight_layout()
    _save(fig, path, 120)
    plt.close(fig)
    return fig
