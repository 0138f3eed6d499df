"""AMBER's generative task (spec A2): CHAIR, Cover, Hal and Cog of image descriptions, as `inference.py`
86-171 and 258-267 compute them.

Per response, with T = the entry's truth words and H = its hallu words: the nouns N (repeats kept) are the
normalizer's lemmas that are words of V. Safe candidates S = the association words of each truth word (each
remembering its truth word), then T; hazard candidates C, the same from H. For each noun: in the global safe
list -> skipped (it stays in the denominator); exactly in S -> credits the truth word of the first match, not
hallucinated; else exactly in C -> credits the first hallu match; then the first C entry with similarity > tau
is credited; then if some S entry has similarity > tau its truth word is credited and the noun is not
hallucinated; otherwise it is hallucinated.

CHAIR = hallucinated / nouns (pooled); Cover = credited truth entries / sum |T|; Hal = share of responses with a
hallucinated noun; Cog = credited hallu entries / sum |H|. `metrics` are exact fractions; `as_printed` is the
script's output (x100, one decimal, each denominator seeded with 0.001, so an empty one prints 0).

`quirks="reference"` keeps every official quirk (a sentence-initial "Dog" never counts; a duplicated truth word
is never fully covered; an association shared by two truth words credits the first only). `fixed` lower-cases
the nouns and every word list, and a match credits every candidate entry holding the matched word.

Each outcome also records, per noun, where it stands in the response (`spans`, for the results browser) and
why it was counted as it was (`matches`: `(rule, entry)`); neither changes a figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlmfix.eval.amber.data import AmberData, AmberEntry
from vlmfix.eval.amber.nouns import AmberNormalizer, Span, located_nouns
from vlmfix.eval.amber.similarity import Similarity
from vlmfix.eval.errors import EvalInputError

QUIRK_MODES = ("reference", "fixed")
SEED = 0.001  # data/metrics.txt seeds every denominator
# why a noun was counted as it was (ResponseOutcome.matches): the rule and the truth / hallu entry it credited
SAFE_LIST, TRUTH, SIMILAR_TRUTH, HALLU, UNMATCHED = "safe list", "truth", "similar to truth", "hallu", "unmatched"


@dataclass(frozen=True)
class ResponseOutcome:
    """One response: its nouns in V, which were hallucinated, and which truth / hallu entries it credited.

    `spans`: each noun's characters in the response (None: not found as written; empty when not located).
    `matches`: per noun `(rule, entry)`: `safe list` (None), `truth` / `similar to truth` (the truth entry
    credited: not hallucinated), `hallu` (hallucinated; the hallu entry credited) or `unmatched` (hallucinated).
    """

    id: int
    nouns: tuple[str, ...]
    hallucinated: tuple[bool, ...]
    truth_credited: tuple[bool, ...]
    hallu_credited: tuple[bool, ...]
    spans: tuple[Span, ...] = ()
    matches: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class GenerativeScores:
    chair: float
    cover: float
    hal: float
    cog: float
    n_responses: int
    n_nouns: int
    n_hallucinated: int
    as_printed: Mapping[str, float]
    outcomes: tuple[ResponseOutcome, ...]

    def to_json(self) -> dict[str, Any]:
        return {"chair": self.chair, "cover": self.cover, "hal": self.hal, "cog": self.cog,
                "n_responses": self.n_responses, "n_nouns": self.n_nouns, "n_hallucinated": self.n_hallucinated,
                "as_printed": dict(self.as_printed)}


class _Candidates:
    """Candidate words, each pointing at the truth (or hallu) entry it credits."""

    def __init__(self, entries: Sequence[str], association: Mapping[str, Sequence[str]]) -> None:
        self.entries = list(entries)
        self.words: list[str] = []
        self.owner: list[int] = []
        for index, word in enumerate(entries):
            self.words += association[word]
            self.owner += [index] * len(association[word])
        self.words += entries
        self.owner += range(len(entries))
        self.credited = [False] * len(entries)

    def credit(self, j: int, every: bool) -> None:
        targets = [k for k, w in enumerate(self.words) if w == self.words[j]] if every else [j]
        for k in targets:
            self.credited[self.owner[k]] = True

    def credit_exact(self, noun: str, every: bool) -> None:
        self.credit(self.words.index(noun), every)

    def first_similar(self, noun: str, similarity: Similarity, threshold: float) -> int | None:
        return next((j for j, w in enumerate(self.words) if similarity(noun, w) > threshold), None)


def score_response(entry: AmberEntry, nouns: Sequence[str], data: AmberData, similarity: Similarity,
                   threshold: float = 0.8, quirks: str = "reference",
                   spans: Sequence[Span] = ()) -> ResponseOutcome:
    """Score one response's nouns (already filtered by V; `spans`: their characters, if known) against one
    generative entry."""
    fixed = quirks == "fixed"
    low = (lambda w: w.lower()) if fixed else (lambda w: w)
    association = {low(k): [low(w) for w in v] for k, v in data.association.items()}
    safe_words = {low(w) for w in data.safe_words}
    safe = _Candidates([low(w) for w in entry.truth], association)
    hazard = _Candidates([low(w) for w in entry.hallu], association)
    flags = []
    matches: list[tuple[str, str | None]] = []
    for noun in nouns:
        if noun in safe_words:
            flags.append(False)
            matches.append((SAFE_LIST, None))
            continue
        if noun in safe.words:
            safe.credit_exact(noun, fixed)
            flags.append(False)
            matches.append((TRUTH, safe.entries[safe.owner[safe.words.index(noun)]]))
            continue
        hallu: str | None = None
        if noun in hazard.words:
            hazard.credit_exact(noun, fixed)
            hallu = hazard.entries[hazard.owner[hazard.words.index(noun)]]
        j = hazard.first_similar(noun, similarity, threshold)
        if j is not None:
            hazard.credit(j, fixed)
            hallu = hallu or hazard.entries[hazard.owner[j]]
        j = safe.first_similar(noun, similarity, threshold)
        if j is not None:
            safe.credit(j, fixed)
            flags.append(False)
            matches.append((SIMILAR_TRUTH, safe.entries[safe.owner[j]]))
            continue
        flags.append(True)
        matches.append((HALLU, hallu) if hallu is not None else (UNMATCHED, None))
    return ResponseOutcome(entry.id, tuple(nouns), tuple(flags), tuple(safe.credited), tuple(hazard.credited),
                           tuple(spans), tuple(matches))


def response_nouns(text: str, data: AmberData, normalizer: AmberNormalizer, quirks: str = "reference") -> list[str]:
    """The response's nouns that are words of V (lower-cased with V under `fixed`)."""
    return [noun for noun, _ in response_mentions(text, data, normalizer, quirks)]


def response_mentions(text: str, data: AmberData, normalizer: AmberNormalizer,
                      quirks: str = "reference") -> list[tuple[str, Span]]:
    """`response_nouns`, each with its characters in `text`."""
    vocabulary = data.vocabulary
    if quirks == "fixed":
        vocabulary = frozenset(w.lower() for w in vocabulary)
        located = [(noun.lower(), span) for noun, span in located_nouns(normalizer, text, vocabulary)]
    else:
        located = located_nouns(normalizer, text, vocabulary)
    return [(noun, span) for noun, span in located if noun in vocabulary]


def score_generative(responses: Mapping[int, str], data: AmberData, normalizer: AmberNormalizer,
                     similarity: Similarity, threshold: float = 0.8, quirks: str = "reference") -> GenerativeScores:
    """Score descriptions (AMBER id -> text) of generative entries.

    Raises:
        EvalInputError: an id that is not a generative entry, a text that is not a string, no responses, or a
            bad quirk mode / threshold.
    """
    if quirks not in QUIRK_MODES:
        raise EvalInputError(f"`amber.quirks` must be one of {', '.join(QUIRK_MODES)}, got {quirks!r}.")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise EvalInputError(f"`amber.threshold` must be a number in (0, 1), got {threshold!r}.")
    if not responses:
        raise EvalInputError("no generative responses to score; check that generation ran.")
    outcomes = []
    for entry_id in sorted(responses):
        entry = data.entry(entry_id)
        text = responses[entry_id]
        if not entry.generative:
            raise EvalInputError(f"AMBER id {entry_id} is a {entry.type!r} entry, not generative; score it with "
                                 "score_discriminative.")
        if not isinstance(text, str):
            raise EvalInputError(f"the response to AMBER id {entry_id} must be a string, got {text!r}.")
        mentions = response_mentions(text, data, normalizer, quirks)
        outcomes.append(score_response(entry, [noun for noun, _ in mentions], data, similarity, threshold, quirks,
                                       [span for _, span in mentions]))
    return summarize_generative(outcomes)


def summarize_generative(outcomes: Sequence[ResponseOutcome]) -> GenerativeScores:
    nouns = sum(len(o.nouns) for o in outcomes)
    hallucinated = sum(sum(o.hallucinated) for o in outcomes)
    truth = sum(len(o.truth_credited) for o in outcomes)
    covered = sum(sum(o.truth_credited) for o in outcomes)
    hallu = sum(len(o.hallu_credited) for o in outcomes)
    cognized = sum(sum(o.hallu_credited) for o in outcomes)
    clean = sum(not any(o.hallucinated) for o in outcomes)
    n = len(outcomes)
    printed = {
        "CHAIR": round(hallucinated / (nouns + SEED) * 100, 1),
        "Cover": round(covered / (truth + SEED) * 100, 1),
        "Hal": round(100 - clean / (n + SEED) * 100, 1),
        "Cog": round(cognized / (hallu + SEED) * 100, 1),
    }
    return GenerativeScores(
        chair=hallucinated / nouns if nouns else 0.0, cover=covered / truth if truth else 0.0,
        hal=(n - clean) / n if n else 0.0, cog=cognized / hallu if hallu else 0.0,
        n_responses=n, n_nouns=nouns, n_hallucinated=hallucinated, as_printed=printed, outcomes=tuple(outcomes),
    )
