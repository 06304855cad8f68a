"""What a teacher buys a student: each distilled group against its twin trained on the labels
alone, against its teacher, and students that differ in one distillation setting against
each other.

A student is a group with ``train.distill`` keys; its twin is the group whose key is the same
without them (same method, placement, activations, rate, data and budget). On the headline
test accuracy (the mean of each run's last k epochs):

- **the teacher's effect**: student − twin, Welch's difference with its 95% CI, TOST at the
  accuracy margin; one Holm family ("does the teacher change the student?") and TOST another;
- **against the teacher**: the teacher's own test accuracy, the share of the twin's gap to the
  teacher that the student closes, (student − twin) / (teacher − twin), and whether the
  student beats its teacher: a one-sided one-sample t-test across seeds that student − teacher
  > 0, Holm over the students (a family of its own), beside the seeds and epochs above it;
- **settings**: students that differ in one distillation setting alone (``kd=hard`` vs
  ``kd=soft`` with the same teacher; one teacher vs another for the same student), compared
  like placements, one Holm family per setting.

The teacher's accuracy is its run folder's own last-k mean when ``train.distill.teacher`` is a
run folder with metrics.csv (as the students' headline is), else what the students recorded
(``train.distill.teacher_test_acc``: its final weights on their test split).
`bitvit.studies.report` adds the section to a sweep's table whenever it has a student.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitvit.studies.runs import DEFAULT_LAST_K, DISTILL_LABELS, Group
from bitvit.studies.stats import (
    Difference,
    adjust_holm,
    holm,
    last_k_mean,
    positive_p_value,
    welch_difference,
)
from bitvit.studies.sweep import DISTILL
from bitvit.studies.tables import DIFFERENCE_HEADER, difference_cells, fmt, mean_std
from bitvit.training import rundir

METRIC = "last_test_acc"  # the headline


@dataclass
class TeacherAccuracy:
    value: float  # nan when unknown
    source: str  # which number: its run folder's last-k mean, or the students' record of it


@dataclass
class Student:
    group: Group
    twin: Group | None
    teacher: TeacherAccuracy
    effect: Difference  # student - twin on the headline
    above_p: float = math.nan  # one-sided, student - teacher > 0
    above_adjusted: float = math.nan

    def gap_closed(self) -> float:
        """(student − twin) / (teacher − twin) on the group means; nan without a gap."""
        if self.twin is None or math.isnan(self.teacher.value):
            return math.nan
        twin = self.twin.stats[METRIC].mean
        gap = self.teacher.value - twin
        return (self.group.stats[METRIC].mean - twin) / gap if gap > 0 else math.nan


def _distilled(group: Group) -> bool:
    return any(k.startswith(DISTILL) for k in group.key)


def _undistilled(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if not k.startswith(DISTILL)}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                     default=str)


def teacher_accuracy(group: Group, last_k: int = DEFAULT_LAST_K) -> TeacherAccuracy:
    """The group's teacher on the test split (see the module's note on which number)."""
    distill = group.runs[0].config["train"]["distill"] if group.runs else {}
    path = _teacher_folder(str(distill.get("teacher")), group.runs[0].path if group.runs else None)
    try:
        rows = rundir.read_metrics(path / "metrics.csv") if path.is_dir() else []
    except rundir.RunFolderError:
        rows = []
    recorded = distill.get("teacher_test_acc")
    # The folder at that path now must be the teacher the students learned from: its last
    # epoch's test accuracy is what they recorded of its final weights (metrics.csv rounds).
    same = (recorded is None or not rows or "test_acc" not in rows[-1]
            or abs(rows[-1]["test_acc"] - float(recorded)) <= 5e-5)
    if rows and all("test_acc" in row for row in rows) and same:  # else: as if no folder
        return TeacherAccuracy(last_k_mean([row["test_acc"] for row in rows], last_k),
                               f"the mean of its run folder's last {last_k} epochs")
    other = "" if same else " (the run folder at its path now ends elsewhere: another run)"
    return TeacherAccuracy(math.nan if recorded is None else float(recorded),
                           f"its final weights, as the students recorded it{other}")


def _teacher_folder(teacher: str, student: Path | None) -> Path:
    """The teacher's path as the students recorded it; a relative one is relative to where the
    sweep ran (the repository, for the committed studies), so it is looked for above the
    student's folder first, then in the working directory: the table is the same wherever
    `bitvit compare` runs."""
    path = Path(teacher)
    if path.is_absolute() or student is None:
        return path
    for above in Path(os.path.abspath(student)).parents:
        if (above / path).is_dir():
            return above / path
    return path


def compare_students(groups: list[Group], margin: float = 0.01, alpha: float = 0.05,
                     last_k: int = DEFAULT_LAST_K) -> list[Student]:
    """Each distilled group against its twin and its teacher, Holm within each question."""
    students = []
    for g in groups:
        if not _distilled(g):
            continue
        twin = next((t for t in groups if not _distilled(t)
                     and _same(t.key, _undistilled(g.key))), None)
        values = g.values(METRIC, last_k)
        effect = (welch_difference(values, twin.values(METRIC, last_k), margin, alpha)
                  if twin is not None else
                  Difference(math.nan, *[math.nan] * 4, margin, math.nan, alpha,
                             reason="no twin without a teacher"))
        s = Student(g, twin, teacher_accuracy(g, last_k), effect)
        if not math.isnan(s.teacher.value):
            s.above_p = positive_p_value([v - s.teacher.value for v in values])
        students.append(s)
    adjust_holm([s.effect for s in students])
    for s, p in zip(students, holm([s.above_p for s in students]), strict=True):
        s.above_adjusted = p
    return students


@dataclass
class SettingPair:
    key: str  # the one distillation setting the two differ in, e.g. train.distill.kind
    first: Group
    second: Group
    difference: Difference  # first - second on the headline

    @property
    def setting(self) -> str:
        return DISTILL_LABELS.get(self.key, self.key.split(".")[-1])


def _apart_in(a: Group, b: Group, key: str) -> bool:
    """Whether two students differ in the distillation setting ``key`` alone: both have it,
    with other values, and every other setting they both have is the same (a setting only one
    has is one its kind does not use, as the temperature of hard distillation)."""
    if key not in a.key or key not in b.key or _same(a.key[key], b.key[key]):
        return False
    shared = (a.key.keys() & b.key.keys()) - {key}
    return (all(_same(a.key[k], b.key[k]) for k in shared)
            and all(k.startswith(DISTILL) for k in a.key.keys() ^ b.key.keys()))


def compare_settings(groups: list[Group], margin: float = 0.01, alpha: float = 0.05,
                     last_k: int = DEFAULT_LAST_K) -> list[SettingPair]:
    """Every two students that differ in one distillation setting alone (the kind under one
    teacher, the teacher under one kind, ...), first − second on the headline; one Holm family
    per setting."""
    distilled = [g for g in groups if _distilled(g)]
    keys = sorted({k for g in distilled for k in g.key if k.startswith(DISTILL)})
    pairs = []
    for key in keys:
        family = [SettingPair(key, a, b, welch_difference(a.values(METRIC, last_k),
                                                          b.values(METRIC, last_k), margin,
                                                          alpha))
                  for a, b in itertools.combinations(distilled, 2) if _apart_in(a, b, key)]
        adjust_holm([p.difference for p in family])
        pairs += family
    return pairs


def _above(s: Student, last_k: int) -> str:
    """Seeds whose last-k mean, and epochs of any seed, beat the teacher."""
    t = s.teacher.value
    if math.isnan(t):
        return "n/a | n/a"
    runs = [r for r in s.group.runs if r.rows]
    seeds = sum(last_k_mean([row["test_acc"] for row in r.rows], last_k) > t for r in runs)
    epochs = sum(row["test_acc"] > t for r in runs for row in r.rows)
    total = sum(len(r.rows) for r in runs)
    return f"{seeds} of {len(runs)} | {epochs} of {total}"


def distillation_markdown(students: list[Student], settings: list[SettingPair],
                          last_k: int = DEFAULT_LAST_K) -> list[str]:
    """The students' tables and the sentences that say what they test; none without one."""
    if not students:
        return []
    margin = 100 * students[0].effect.margin
    tests = sum(s.effect.available for s in students)
    sources = sorted({s.teacher.source for s in students})
    lines = ["", f"Distillation, the teacher's effect: each student (trained against a teacher) "
             f"against its twin trained on the labels alone, on the test accuracy of the last "
             f"{last_k} epochs (student − twin, in points): 95% CI (Welch–Satterthwaite); "
             + (f"Welch p raw and Holm-adjusted over the {tests} student{'s' * (tests != 1)} "
                f"of this table, a family of its own; TOST at ±{margin:g} points, another; "
                "resolvable margin as above." if tests else
                "tests possible with 2 or more finished seeds on each side (not yet): the "
                "differences of the means are shown without p-values."), "",
             f"| student | twin | {DIFFERENCE_HEADER} |", "|---" * 9 + "|"]
    lines += [f"| {s.group.label} | {s.twin.label if s.twin else 'none'} | "
              f"{difference_cells(s.effect, METRIC)} |" for s in students]
    above = sum(not math.isnan(s.above_p) for s in students)
    lines += ["", f"Against the teacher: the teacher's test accuracy ({'; or '.join(sources)}); "
              f"the share of the twin's gap to the teacher the student closes, (student − twin) "
              f"/ (teacher − twin) on the means (n/a without a gap); the student's seeds whose "
              f"last-{last_k} mean, and epochs of any seed, above the teacher; p: one-sided "
              f"one-sample t-test across seeds that student − teacher > 0, "
              + (f"raw and Holm-adjusted over the {above} student{'s' * (above != 1)} of this "
                 f"table, a family of its own." if above else
                 "possible with 2 or more finished seeds (not yet)."), "",
              f"| student | student, last {last_k} | twin, last {last_k} | teacher | gap closed "
              f"| seeds above teacher | epochs above teacher | p (student > teacher) | Holm p |",
              "|---" * 9 + "|"]
    for s in students:
        closed = s.gap_closed()
        tested = ("n/a | n/a" if math.isnan(s.above_p)
                  else f"{s.above_p:.3g} | {s.above_adjusted:.3g}")
        lines.append(f"| {s.group.label} | {mean_std(s.group.stats[METRIC], METRIC)} | "
                     + (mean_std(s.twin.stats[METRIC], METRIC) if s.twin else "n/a")
                     + f" | {fmt(s.teacher.value, METRIC)} | "
                     + ("n/a" if math.isnan(closed) else f"{100 * closed:.0f}%")
                     + f" | {_above(s, last_k)} | {tested} |")
    for key in dict.fromkeys(p.key for p in settings):
        family = [p for p in settings if p.key == key]
        n = sum(p.difference.available for p in family)
        name = family[0].setting
        lines += ["", f"Distillation settings against each other, `{key}` ({name}): students "
                  f"that differ in it alone (first − second, points): "
                  + (f"Welch p Holm-adjusted over the {n} pair{'s' * (n != 1)} of this table, "
                     f"a family of its own; TOST another." if n else
                     "tests possible with 2 or more finished seeds on each side (not yet)."),
                  "",
                  f"| first | second | {DIFFERENCE_HEADER} |", "|---" * 9 + "|"]
        lines += [f"| {p.first.label} | {p.second.label} | "
                  f"{difference_cells(p.difference, METRIC)} |" for p in family]
    return lines
