"""The figures of a comparison: loss and accuracy per epoch per group, titled with where and
how long the runs trained. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bitvit.report import Group, Run


def devices(runs: list[Run]) -> list[str]:
    """The devices the runs trained on (run.json ``device``), each once."""
    return sorted({str(r.info.get("device", "unknown device")) for r in runs})


def provenance(runs: list[Run], full_epochs: int | None = None) -> str:
    """Where and how long the runs trained, e.g. ``device: cpu (...); 15 of 100 epochs``; the
    figure carries it so that it never travels without its device and budget."""
    configured = ", ".join(map(str, sorted({r.epochs_configured for r in runs}))) or "0"
    budget = f"{configured} of {full_epochs} epochs" if full_epochs else f"{configured} epochs"
    return f"device: {'; '.join(devices(runs)) or 'none'}; {budget}"


def plot_groups(groups: list[Group], path: str | Path, title: str = "",
                full_epochs: int | None = None) -> Any:
    """Loss and accuracy per epoch (train solid, test dashed), one color per group: the mean
    over seeds with a min-max band, over the epochs every run of the group has. The title says
    on what device the plotted runs trained and their budget (of ``full_epochs`` when given).
    Returns the (closed) matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    shown = [g for g in groups if any(r.rows for r in g.runs)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.12 * len(shown)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, g in enumerate(shown):
        # The default cycle for a few groups; tab20 once there are more than it has colors.
        color = colors[i] if len(shown) <= len(colors) else plt.cm.tab20(i % 20)
        runs = [r for r in g.runs if r.rows]
        n = min(len(r.rows) for r in runs)
        epochs = np.arange(1, n + 1)
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, style in (("train", "-"), ("test", "--")):
                values = np.array([[row[f"{split}_{metric}"] for row in r.rows[:n]]
                                   for r in runs])
                ax.plot(epochs, values.mean(0), style, color=color)
                if len(runs) > 1:
                    ax.fill_between(epochs, values.min(0), values.max(0), color=color,
                                    alpha=0.15, linewidth=0)
        handles.append(Line2D([], [], color=color, label=f"{g.label} (n={len(runs)})"))
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles += [Line2D([], [], color="gray", linestyle="-", label="train"),
                Line2D([], [], color="gray", linestyle="--", label="test")]
    # One entry per group, below the panels, so many groups never cover the curves.
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    legend = "mean over seeds, band: min-max over seeds; train solid, test dashed"
    lines = [title, provenance([r for g in shown for r in g.runs if r.rows], full_epochs), legend]
    fig.suptitle("\n".join(line for line in lines if line), fontsize=10)
    rows = -(-len(handles) // min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
