"""AMBER's discriminative task (spec A5): existence, attribute and relation yes/no questions, "No" as the
positive class, as `inference.py` 173-256 and 269-338 score them; and the AMBER score.

A response is parsed by a named parser of `vlmfix.eval.yesno` (`amber_exact` by default: exactly "Yes" or
"No"; anything else is unknown, which is wrong and not an answered No). Per group: Acc = correct / questions;
P = (answered No and truth no) / answered No; R = (answered No and truth no) / truth no; F1 = 2PR / (P + R).
Groups: `overall`, `existence` (type discriminative-hallucination), `attribute` (the three attribute types,
also per type: `state`, `number`, `action`), `relation` (every other type).

`metrics` are exact fractions (0 for an empty denominator). `as_printed` is the script's output: x100 with one
decimal, each per-type denominator seeded with 0.001 (the attribute sums three seeded counters, 0.003), F1
computed from the already rounded P and R with eps 0.0001 (0.001 for existence).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmfix.eval.amber.data import ATTRIBUTE_TYPES, EXISTENCE, AmberData
from vlmfix.eval.amber.generative import SEED, GenerativeScores
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.yesno import NO, YES, answer_rates, get_parser

TYPE_GROUPS = {EXISTENCE: "existence", ATTRIBUTE_TYPES[0]: "state", ATTRIBUTE_TYPES[1]: "number",
               ATTRIBUTE_TYPES[2]: "action"}  # every other discriminative type: relation
DIMENSIONS = ("existence", "attribute", "relation")


@dataclass(frozen=True)
class Counts:
    """The script's counters of one group (before seeding)."""

    n: int = 0
    correct: int = 0
    truth_no: int = 0
    answered_no: int = 0
    no_hit: int = 0  # answered No and truth no
    seeds: int = 1  # how many seeded per-type counters this group sums

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.n + other.n, self.correct + other.correct, self.truth_no + other.truth_no,
                      self.answered_no + other.answered_no, self.no_hit + other.no_hit, self.seeds + other.seeds)

    def exact(self) -> dict[str, float]:
        p = self.no_hit / self.answered_no if self.answered_no else 0.0
        r = self.no_hit / self.truth_no if self.truth_no else 0.0
        return {"accuracy": self.correct / self.n if self.n else 0.0, "precision": p, "recall": r,
                "f1": 2 * p * r / (p + r) if p + r else 0.0, "n": self.n}

    def printed(self, eps: float = 0.0001) -> dict[str, float]:
        seed = SEED * self.seeds
        accuracy = round(self.correct / (self.n + seed) * 100, 1)
        precision = round(self.no_hit / (self.answered_no + seed) * 100, 1)
        recall = round(self.no_hit / (self.truth_no + seed) * 100, 1)
        f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100, 1)
        return {"Accuracy": accuracy, "Precision": precision, "Recall": recall, "F1": f1}


@dataclass(frozen=True)
class DiscriminativeScores:
    parser: str
    groups: Mapping[str, Mapping[str, float]]
    as_printed: Mapping[str, Mapping[str, float]]
    unknown_rate: float
    yes_ratio: float
    n_questions: int
    predictions: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)  # id -> parsed
    correct: Mapping[int, bool] = field(default_factory=dict, repr=False, compare=False)  # id -> scored correct

    @property
    def f1(self) -> float:
        return self.groups["overall"]["f1"]

    def to_json(self) -> dict[str, Any]:
        return {"parser": self.parser, **{k: dict(v) for k, v in self.groups.items()},
                "as_printed": {k: dict(v) for k, v in self.as_printed.items()},
                "unknown_rate": self.unknown_rate, "yes_ratio": self.yes_ratio, "n_questions": self.n_questions}


def score_discriminative(responses: Mapping[int, str], data: AmberData,
                         parser: str = "amber_exact") -> DiscriminativeScores:
    """Score yes/no answers (AMBER id -> raw text) of discriminative entries."""
    answer_parser = get_parser(parser)
    if not responses:
        raise EvalInputError("no discriminative responses to score; check that generation ran.")
    per_type: dict[str, Counts] = {}
    parsed: dict[int, str] = {}
    right: dict[int, bool] = {}
    for entry_id in sorted(responses):
        entry = data.entry(entry_id)
        if entry.generative:
            raise EvalInputError(f"AMBER id {entry_id} is generative; score it with score_generative.")
        assert isinstance(entry.truth, str)
        prediction = answer_parser(responses[entry_id], entry.truth)
        parsed[entry_id] = prediction
        group = TYPE_GROUPS.get(entry.type, "relation")
        correct = (entry.truth == YES and prediction == YES) or (entry.truth == NO and prediction == NO)
        right[entry_id] = correct
        one = Counts(1, int(correct), int(entry.truth == NO), int(prediction == NO),
                     int(prediction == NO and entry.truth == NO), seeds=0)
        per_type[group] = per_type.get(group, Counts(seeds=1)) + one
    empty = Counts(seeds=1)
    attribute = sum((per_type.get(t, empty) for t in ("state", "number", "action")), Counts(seeds=0))
    overall = sum(per_type.values(), Counts(seeds=0))
    overall = Counts(overall.n, overall.correct, overall.truth_no, overall.answered_no, overall.no_hit, seeds=1)
    groups = {"overall": overall, "existence": per_type.get("existence", empty), "attribute": attribute,
              "relation": per_type.get("relation", empty),
              **{t: per_type.get(t, empty) for t in ("state", "number", "action")}}
    rates = answer_rates(list(parsed.values()))
    return DiscriminativeScores(
        parser=parser,
        groups={name: counts.exact() for name, counts in groups.items()},
        as_printed={name: counts.printed(0.001 if name == "existence" else 0.0001) for name, counts in groups.items()},
        unknown_rate=rates.unknown_rate, yes_ratio=rates.yes_ratio, n_questions=len(parsed), predictions=parsed,
        correct=right,
    )


def amber_score(generative: GenerativeScores, discriminative: DiscriminativeScores) -> float:
    """AMBER Score = (1 - CHAIR + F1) / 2 with the overall discriminative F1 (as a fraction; x100 for the paper).

    >>> round(100 * (1 - 2 / 7 + 0.5) / 2, 1)
    60.7
    """
    return (1 - generative.chair + discriminative.f1) / 2


def missing_dimensions(discriminative: DiscriminativeScores) -> list[str]:
    """The dimensions with no question scored (the AMBER score needs all three)."""
    return [d for d in DIMENSIONS if not discriminative.groups[d]["n"]]
