"""Each method at its own learning rate: the rate chosen on validation, the result reported on test.

For runs that differ in ``train.lr`` (and in the method), `choose_rates` picks each method's rate
by the highest validation accuracy (the mean over each run's last k epochs, then over seeds; a
tie goes to the smaller rate), and compares the ranking of methods by test accuracy (last k) at
those rates with the ranking at the rate every other study uses (1e-3). The order claims of the
chosen-rate ranking are Welch tests between neighbours, Holm-adjusted over the neighbours. An
incomplete grid (a planned run missing or unfinished) gives no choice and no verdict.
`rates_section` writes the Markdown section of ``results/README.md`` and `plot_rates` its figure.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from bitvit import files
from bitvit.studies.runs import (
    DEFAULT_LAST_K,
    Run,
    data_size,
    group_labels,
    has_val,
    load_run,
    provenance,
    provenance_lines,
)
from bitvit.studies.stats import (
    Difference,
    Summary,
    adjust_holm,
    last_k_mean,
    summarize,
    welch_difference,
)
from bitvit.studies.sweep import Sweep, SweepError, planned_key, sweep_config
from bitvit.training.config import TrainConfig

REFERENCE_LR = 1e-3  # the rate of every other study
FIGURE = "lr.png"


@dataclass
class Cell:
    """One method at one rate: per finished seed, validation and test accuracy over the last k."""

    lr: float
    seeds: list[Any] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)  # planned seeds without a finished run

    @property
    def val_summary(self) -> Summary:
        return summarize(self.val)

    @property
    def test_summary(self) -> Summary:
        return summarize(self.test)


@dataclass
class MethodRates:
    label: str
    cells: dict[float, Cell]  # by rate, ascending
    chosen: float | None = None  # None while the method's grid is incomplete
    tied: list[float] = field(default_factory=list)  # rates sharing the highest validation mean

    @property
    def complete(self) -> bool:
        return all(not c.missing and c.val for c in self.cells.values())


@dataclass
class RateChoice:
    methods: list[MethodRates]
    lrs: list[float]
    last_k: int
    reference: float = REFERENCE_LR
    ranking_reference: list[str] = field(default_factory=list)  # best first; empty: no verdict
    ranking_chosen: list[str] = field(default_factory=list)
    # (upper, lower, upper - lower at their chosen rates), in the chosen-rate ranking, Holm over
    # these neighbours.
    adjacent: list[tuple[str, str, Difference]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.methods) and all(m.complete for m in self.methods)

    @property
    def same_ranking(self) -> bool | None:
        if not self.ranking_chosen:
            return None
        return self.ranking_chosen == self.ranking_reference

    def method(self, label: str) -> MethodRates:
        return next(m for m in self.methods if m.label == label)

    def missing(self) -> list[str]:
        """``METHOD at lr=R: seeds S`` for every cell with planned seeds not (yet) finished."""
        return [f"{m.label} at lr={_lr(c.lr)}: "
                + (f"seeds {', '.join(map(str, c.missing))}" if c.missing else "no seeds")
                for m in self.methods for c in m.cells.values() if c.missing or not c.val]


def _lr(x: float) -> str:
    return f"{x:g}"


def _method_key(config: dict[str, Any]) -> dict[str, Any]:
    return planned_key(config, frozenset({"train.lr"}))


def _val_last_k(run: Run, k: int) -> float:
    return last_k_mean([row["val_acc"] for row in run.rows], k)


def _test_last_k(run: Run, k: int) -> float:
    return last_k_mean([row["test_acc"] for row in run.rows], k)



def _rate_of(config: dict[str, Any]) -> float:
    """A run's rate from its config as written: a hand-written one may leave it to the default."""
    return float((config.get("train") or {}).get("lr", TrainConfig().lr))


def _seed_of(config: dict[str, Any]) -> Any:
    return (config.get("train") or {}).get("seed", TrainConfig().seed)


def choose_rates(runs: list[Run], last_k: int = DEFAULT_LAST_K,
                 planned: list[dict[str, Any]] | None = None, margin: float = 0.01,
                 reference: float = REFERENCE_LR) -> RateChoice:
    """Each method's rate by validation accuracy, and the rankings on test at those rates and at
    ``reference``. ``planned``: the config dicts of every run of the grid (a sweep's points);
    without it, the grid is every method seen at every rate and seed seen. Only finished runs
    with a validation split count; anything planned and not finished makes the grid
    incomplete, and an incomplete grid gets no choice, no ranking and no verdict."""
    configs = planned if planned is not None else [r.config for r in runs]
    keys: dict[str, dict[str, Any]] = {}
    for c in configs + [r.config for r in runs]:
        key = _method_key(c)
        keys.setdefault(json.dumps(key, sort_keys=True, default=str), key)
    labels = dict(zip(keys, group_labels(list(keys.values())), strict=True))
    lrs = sorted({_rate_of(c) for c in configs})
    seeds = sorted({_seed_of(c) for c in configs}, key=str)
    expected = ({(json.dumps(_method_key(c), sort_keys=True, default=str),
                  _rate_of(c), _seed_of(c)) for c in configs}
                if planned is not None else None)
    # A method's grid is the rates planned for it (a sweep may give one method an extra rate).
    rates_of: dict[str, set[float]] = {name: set() for name in keys}
    for c in configs:
        name = json.dumps(_method_key(c), sort_keys=True, default=str)
        rates_of[name].add(_rate_of(c))
    methods = {name: MethodRates(labels[name], {lr: Cell(lr) for lr in sorted(rates_of[name])})
               for name in keys}
    for r in sorted(runs, key=lambda r: str(r.seed)):
        name = json.dumps(_method_key(r.config), sort_keys=True, default=str)
        cell = methods[name].cells.setdefault(_rate_of(r.config),
                                              Cell(_rate_of(r.config)))
        if r.seed in cell.seeds:  # one run twice (a copy) would count as two seeds
            raise SweepError(f"{r.path}: a second run of seed {r.seed} at lr {cell.lr} for "
                             f"{labels[name]}; a cell's runs must be different seeds")
        # A non-finite validation accuracy (an edited file) leaves its seed missing: no choice.
        if r.finished and has_val(r) and math.isfinite(_val_last_k(r, last_k)):
            cell.seeds.append(r.seed)
            cell.val.append(_val_last_k(r, last_k))
            cell.test.append(_test_last_k(r, last_k))
    for name, m in methods.items():
        m.cells = dict(sorted(m.cells.items()))
        for cell in m.cells.values():
            wanted = ([s for s in seeds if (name, cell.lr, s) in expected]
                      if expected is not None else seeds)
            cell.missing = [s for s in wanted if s not in cell.seeds]
        if m.complete:
            best = max(c.val_summary.mean for c in m.cells.values())
            # Equal means only up to rounding: the smaller rate wins a tie.
            m.tied = [lr for lr, c in m.cells.items()
                      if math.isclose(c.val_summary.mean, best, rel_tol=0, abs_tol=1e-12)]
            m.chosen = min(m.tied)
    choice = RateChoice(sorted(methods.values(), key=lambda m: m.label), lrs, last_k, reference)
    # Rankings compare every method at the reference rate: each must have run it.
    if choice.complete and all(reference in m.cells for m in choice.methods):
        _rank(choice, margin)
    return choice


def _rank(choice: RateChoice, margin: float) -> None:
    def ranking(rate_of: Any) -> list[str]:
        return [m.label for m in sorted(
            choice.methods, key=lambda m: (-m.cells[rate_of(m)].test_summary.mean, m.label))]

    choice.ranking_reference = ranking(lambda m: choice.reference)
    choice.ranking_chosen = ranking(lambda m: m.chosen)
    for upper, lower in pairwise(choice.ranking_chosen):
        a, b = choice.method(upper), choice.method(lower)
        choice.adjacent.append((upper, lower, welch_difference(
            a.cells[a.chosen].test, b.cells[b.chosen].test, margin)))
    adjust_holm([d for _, _, d in choice.adjacent])


# ---------------------------------------------------------------------------------------------
# The section and its figure
# ---------------------------------------------------------------------------------------------


def _pct(s: Summary) -> str:
    if s.n == 0:
        return "n/a"
    if s.n == 1:
        return f"{100 * s.mean:.2f} (1 seed)"
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}"


def _chosen_cell(m: MethodRates) -> str:
    if m.chosen is None:
        return "—"
    if len(m.tied) > 1:
        others = ", ".join(_lr(lr) for lr in m.tied if lr != m.chosen)
        return f"{_lr(m.chosen)} (tied with {others}: the smaller)"
    return _lr(m.chosen)


def verdict(choice: RateChoice) -> str:
    """The sentence on whether the ranking at per-method rates is the ranking at the reference,
    and which of its neighbour orders are significant after Holm."""
    if not choice.complete:
        return "Not all runs finished: no verdict yet."
    if not choice.ranking_chosen:
        return f"lr={_lr(choice.reference)} is not in the grid: no verdict."
    chosen = " > ".join(choice.ranking_chosen)
    if choice.same_ranking:
        head = (f"The ranking at per-method rates is the same as the ranking at "
                f"lr={_lr(choice.reference)}: {chosen}.")
    else:
        head = (f"The ranking at per-method rates differs from the ranking at "
                f"lr={_lr(choice.reference)}: {chosen} (at {_lr(choice.reference)}: "
                f"{' > '.join(choice.ranking_reference)}).")
    parts = []
    for upper, lower, d in choice.adjacent:
        if not d.available:
            parts.append(f"{upper} > {lower}: n/a ({d.reason})")
            continue
        status = ("significant" if d.significant else
                  "not significant: this order is not established")
        parts.append(f"{upper} − {lower} {100 * d.diff:+.2f} pts, Holm p {d.p_adjusted:.3g} "
                     f"({status})")
    edge = [f"{m.label} ({_lr(m.chosen)})" for m in choice.methods
            if m.chosen in (min(m.cells), max(m.cells))]
    tail = (" Chosen at the edge of the method's own grid, so its best rate may lie beyond it: "
            f"{', '.join(edge)}." if edge else
            " Every chosen rate is interior to its method's grid.")
    tests = sum(d.available for _, _, d in choice.adjacent)
    if not parts:
        return head + tail
    if not tests:
        return (f"{head} Neighbours at the chosen rates (no test possible): {'; '.join(parts)}."
                + tail)
    return (head + f" Neighbours at the chosen rates (Welch, Holm over {tests} "
            f"pair{'s' if tests > 1 else ''}): " + "; ".join(parts) + "." + tail)


def rates_markdown(choice: RateChoice, runs: list[Run], full_epochs: int | None = None,
                   figure: str | None = None) -> str:
    """The section: provenance, the per-method table, the two rankings, the verdict."""
    k, ref = choice.last_k, _lr(choice.reference)
    lines = ["### Learning rate per method (chosen on validation)", "",
             *provenance_lines(runs, full_epochs), "",
             f"Each method's rate is the one with the highest validation accuracy (the mean over "
             f"each run's last {k} epochs, then over seeds; a tie goes to the smaller rate). Test "
             f"accuracy (mean over the last {k} epochs) is reported at that rate and at "
             f"lr={ref}, the rate of the other studies (whose ranking is the one at {ref}). "
             "Mean ± std (ddof 1) over seeds; accuracies in %.", ""]
    vals = [f"val acc, last {k}, lr={_lr(lr)}" for lr in choice.lrs]
    lines.append("| method | " + " | ".join(vals) + f" | chosen lr | test acc, last {k}, at "
                 f"chosen lr | test acc, last {k}, at lr={ref} |")
    lines.append("|---" * (len(vals) + 4) + "|")
    for m in choice.methods:
        at_chosen = _pct(m.cells[m.chosen].test_summary) if m.chosen is not None else "—"
        at_ref = (_pct(m.cells[choice.reference].test_summary)
                  if choice.reference in m.cells else "n/a")
        lines.append(f"| {m.label} | "
                     + " | ".join(_pct(m.cells[lr].val_summary) if lr in m.cells else "n/a"
                                  for lr in choice.lrs)
                     + f" | {_chosen_cell(m)} | {at_chosen} | {at_ref} |")
    lines.append("")
    if choice.complete and choice.ranking_chosen:
        lines += [f"Ranking by test accuracy (last {k}) at lr={ref}: "
                  f"{' > '.join(choice.ranking_reference)}.",
                  f"Ranking at each method's chosen rate: {' > '.join(choice.ranking_chosen)}.",
                  ""]
    else:
        lines += ["Missing or unfinished: " + "; ".join(choice.missing()) + "."
                  if choice.missing() else "", ""]
    lines += [verdict(choice), ""]
    if figure:
        lines.append(f"![validation accuracy against learning rate]({figure})")
    kept = [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]  # no 2 blanks
    return "\n".join(kept).rstrip() + "\n"


def plot_rates(choice: RateChoice, runs: list[Run], path: str | Path, title: str = "",
               full_epochs: int | None = None) -> Any:
    """Validation accuracy (last k, %) against the rate per method, log x: a dot per seed, a
    line through the means, a ring on the chosen rate. Returns the (closed) Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(choice.methods):
        color = colors[i % len(colors)]
        cells = [c for c in m.cells.values() if c.val]
        for c in cells:
            ax.scatter([c.lr] * len(c.val), [100 * v for v in c.val], s=14, color=color,
                       alpha=0.6, linewidths=0)
        ax.plot([c.lr for c in cells], [100 * c.val_summary.mean for c in cells], "-",
                color=color, label=m.label)
        if m.chosen is not None:
            ax.scatter([m.chosen], [100 * m.cells[m.chosen].val_summary.mean], s=90,
                       facecolors="none", edgecolors=color, linewidths=1.5)
    ax.set_xscale("log")
    ax.set_xticks(choice.lrs, [_lr(lr) for lr in choice.lrs])
    ax.minorticks_off()
    optimizers = sorted({str((r.config.get("train") or {}).get("optimizer", "adam"))
                         for r in runs})
    ax.set_xlabel(f"learning rate ({', '.join(optimizers)})")
    ax.set_ylabel(f"validation accuracy, last {choice.last_k} epochs (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    shown = [r for r in runs if r.finished and has_val(r)]
    lines = [title, provenance(shown, full_epochs), data_size(shown),
             "dots: seeds; line: mean over seeds; ring: the chosen rate"]
    # Wrapped to the figure's width: a long provenance line was cut off at both sides.
    fig.suptitle("\n".join(textwrap.fill(line, 100) for line in lines if line), fontsize=9)
    fig.tight_layout()
    files.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return fig


def varies_lr(sweep: Sweep) -> bool:
    return len({p.get("train.lr") for p in sweep.points}) > 1


def rates_section(sweep: Sweep, paths: list[Path], link_dir: str, margin: float = 0.01,
                  last_k: int = DEFAULT_LAST_K) -> str:
    """The section of ``results/README.md`` for a sweep whose grid varies ``train.lr`` and
    whose runs have a validation split (else ""), with its figure in the study's folder."""
    if not varies_lr(sweep):
        return ""
    runs = [load_run(p) for p in paths]
    if not any(has_val(r) for r in runs):
        return ""
    planned = [sweep_config(sweep, p).to_dict() for p in sweep.points]
    choice = choose_rates(runs, last_k, planned, margin)
    plot_rates(choice, runs, sweep.out / FIGURE, sweep.title, sweep.full_epochs)
    return rates_markdown(choice, runs, sweep.full_epochs, f"{link_dir}/{FIGURE}")
