"""`amber_scored.json`: what AMBER's scorer decided per response, for the results browser and for reading by hand.

Per generative response: the text, the entry's truth and hallu words, and each noun the scorer counted with its
characters in the text (`start`, `end`; None where not found), whether it was hallucinated and the rule and entry
that decided it (`ResponseOutcome.matches`). Per discriminative response: the text, the parsed answer, the
truth and whether the scorer counted it correct. The figures are the scores' own `to_json()`, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vlmfix.eval._io import PathLike, atomic_write_text
from vlmfix.eval.amber.data import AmberData
from vlmfix.eval.amber.discriminative import TYPE_GROUPS, DiscriminativeScores
from vlmfix.eval.amber.generative import GenerativeScores, ResponseOutcome


def generative_rows(outcomes: tuple[ResponseOutcome, ...], responses: Mapping[int, str],
                    data: AmberData) -> list[dict[str, Any]]:
    rows = []
    for outcome in outcomes:
        entry = data.entry(outcome.id)
        spans = outcome.spans or (None,) * len(outcome.nouns)
        matches = outcome.matches or ((None, None),) * len(outcome.nouns)
        mentions = [{"noun": noun, "start": span[0] if span else None, "end": span[1] if span else None,
                     "hallucinated": flag, "rule": rule, "entry": word}
                    for noun, span, flag, (rule, word) in zip(outcome.nouns, spans, outcome.hallucinated, matches)]
        rows.append({"id": outcome.id, "response": responses[outcome.id], "truth": list(entry.truth),
                     "hallu": list(entry.hallu), "mentions": mentions,
                     "covered": [w for w, hit in zip(entry.truth, outcome.truth_credited) if hit],
                     "cognized": [w for w, hit in zip(entry.hallu, outcome.hallu_credited) if hit]})
    return rows


def discriminative_rows(scores: DiscriminativeScores, responses: Mapping[int, str],
                        data: AmberData) -> list[dict[str, Any]]:
    rows = []
    for entry_id, parsed in scores.predictions.items():
        entry = data.entry(entry_id)
        rows.append({"id": entry_id, "type": entry.type, "group": TYPE_GROUPS.get(entry.type, "relation"),
                     "truth": entry.truth, "response": responses[entry_id], "parsed": parsed,
                     "correct": scores.correct[entry_id]})
    return rows


def amber_scored(data: AmberData, responses: Mapping[int, str], generative: GenerativeScores | None,
                 discriminative: DiscriminativeScores | None,
                 fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The file's content (`responses`: AMBER id -> raw text, of both parts)."""
    out: dict[str, Any] = {}
    if generative is not None:
        out["generative"] = {"scores": generative.to_json(),
                             "responses": generative_rows(generative.outcomes, responses, data)}
    if discriminative is not None:
        out["discriminative"] = {"scores": discriminative.to_json(),
                                 "responses": discriminative_rows(discriminative, responses, data)}
    if fingerprint is not None:
        out["fingerprint"] = dict(fingerprint)
    return out


def write_amber_scored(path: PathLike, data: AmberData, responses: Mapping[int, str],
                       generative: GenerativeScores | None, discriminative: DiscriminativeScores | None,
                       fingerprint: Mapping[str, Any] | None = None) -> None:
    """Write `amber_scored.json` (see the module docstring)."""
    content = amber_scored(data, responses, generative, discriminative, fingerprint)
    atomic_write_text(path, json.dumps(content, indent=1, ensure_ascii=False) + "\n")
