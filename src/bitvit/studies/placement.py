"""Between placements: where in the model to quantize (``quant.where``), the second study's own
question, asked apart from the comparison with full precision.

Groups that differ only in ``quant.where`` (same method, activation setting and everything
else) form a setting; within each, every two placements are compared on the headline test
accuracy (the mean of each run's last k epochs): Welch's difference with its 95% CI, Welch's
p-value and TOST at the accuracy margin. The table's placement tests are one Holm family (the
question "does where matter?"), their TOST tests another. `compare_placements` computes it,
`placements_markdown` writes it; `bitvit.studies.report` adds it to a sweep's table whenever
some of its groups differ only in where they quantize.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from bitvit.studies.runs import DEFAULT_LAST_K, Group
from bitvit.studies.stats import Difference, adjust_holm, welch_difference
from bitvit.studies.tables import DIFFERENCE_HEADER, difference_cells

# The order of the pairs: all - mlp, all - attn, mlp - attn; other placements after these.
PLACEMENTS = ("all", "mlp", "attn")
METRIC = "last_test_acc"  # the headline


@dataclass
class PlacementPair:
    setting: str  # the method and activation setting, e.g. ``xnor act1``
    first: Group
    second: Group
    difference: Difference  # first - second on the headline

    @property
    def name(self) -> str:
        return f"{self.first.key['quant.where']} − {self.second.key['quant.where']}"


def _rank(group: Group) -> tuple[int, str]:
    where = str(group.key["quant.where"])
    return (PLACEMENTS.index(where) if where in PLACEMENTS else len(PLACEMENTS), where)


def _setting(group: Group) -> str:
    """The group's label without its placement (``sign all act1`` -> ``sign act1``)."""
    parts = group.label.split(" ")
    where = str(group.key["quant.where"])
    if where in parts:
        parts.remove(where)
    return " ".join(parts) or str(group.key.get("quant.method"))


def placement_sets(groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """The settings with two or more placements: (setting, its groups in `PLACEMENTS` order),
    in the order of their first group among ``groups``."""
    sets: dict[str, list[Group]] = {}
    for g in groups:
        if g.is_fp or "quant.where" not in g.key:
            continue
        rest = {k: v for k, v in g.key.items() if k != "quant.where"}
        sets.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(g)
    return [(_setting(members[0]), sorted(members, key=_rank))
            for members in sets.values() if len(members) > 1]


def compare_placements(groups: list[Group], margin: float = 0.01, alpha: float = 0.05,
                       last_k: int = DEFAULT_LAST_K) -> list[PlacementPair]:
    """Every two placements of each setting, first - second on the headline test accuracy, with
    Holm over all of them (one family; TOST another)."""
    pairs = [PlacementPair(setting, a, b, welch_difference(a.values(METRIC, last_k),
                                                           b.values(METRIC, last_k), margin,
                                                           alpha))
             for setting, members in placement_sets(groups)
             for a, b in itertools.combinations(members, 2)]
    adjust_holm([p.difference for p in pairs])
    return pairs


def placements_markdown(pairs: list[PlacementPair], last_k: int = DEFAULT_LAST_K) -> list[str]:
    """The placements table and the sentence that says what it tests; no lines without pairs."""
    if not pairs:
        return []
    tests = sum(p.difference.available for p in pairs)
    margin = 100 * pairs[0].difference.margin
    settings = list(dict.fromkeys(p.setting for p in pairs))
    head = (f"Placements (`quant.where`), the question of where to quantize: within each method "
            f"and activation setting ({', '.join(settings)}), every two placements compared on "
            f"the test accuracy of the last {last_k} epochs (first − second, in points): 95% "
            f"confidence interval (Welch–Satterthwaite); Welch t-test p-value, ")
    if tests:
        n = f"{tests} placement test{'s' * (tests != 1)}"
        head += (f"raw and Holm-adjusted over the {n} of this table, one family of its own, "
                 f"apart from the comparisons with full precision (differs: Holm p < 0.05); "
                 f"TOST equivalence p-value at a margin of ±{margin:g} accuracy points, raw and "
                 f"Holm-adjusted over this table's {tests} TOST test{'s' * (tests != 1)}, a "
                 f"family of their own (equivalent: TOST Holm p < 0.05); resolvable margin: the "
                 f"half-width of the "
                 f"90% confidence interval, the smallest margin TOST can confirm.")
    else:
        head += ("not possible yet (each placement needs at least two finished seeds); the "
                 "differences of the means are shown without p-values.")
    header = DIFFERENCE_HEADER.replace("Holm p", "Holm p (this table's family)")
    lines = ["", head, "", f"| method and activations | placements | {header} |",
             "|---" * 9 + "|"]
    lines += [f"| {p.setting} | {p.name} | {difference_cells(p.difference, METRIC)} |"
              for p in pairs]
    return lines
