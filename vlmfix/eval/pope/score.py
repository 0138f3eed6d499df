"""POPE metrics (spec B6). Yes is the positive class; pure functions.

accuracy = (TP + TN) / N, precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R);
yes_ratio = predicted yes / N (from predictions, never from labels; it has no "better" direction);
unknown_rate = unparseable / N. An unknown answer scores as wrong: FN for label yes, FP for label no
(lmms-eval leaves it out of precision and recall; vlmfix does not). A zero denominator gives 0 and a warning.

Answers are joined to questions by `question_id`, never by position; ids are normalised to int ("42" is 42,
and 42 given twice as 42 and "42" raises). A partial run scores the ids it has and says so (`complete=False`,
`n_missing`); a run with no answer at all raises. Answers must be strings: None or NaN (a failed generation,
a pandas gap) raises, naming the ids, where the reference scorers would crash or count it as "yes".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any

from vlmfix.eval._io import PathLike, as_id, int_keyed, read_records, shown
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.pope.parsers import NO, UNKNOWN, YES, get_parser
from vlmfix.eval.pope.questions import LABELS, PopeQuestion, check_unique_ids

PREDICTIONS = (YES, NO, UNKNOWN)


@dataclass(frozen=True)
class PopeCounts:
    """Confusion counts; `unknown` answers are also counted inside fn (label yes) or fp (label no)."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unknown: int = 0
    predicted_yes: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: PopeCounts) -> PopeCounts:
        return PopeCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


@dataclass(frozen=True)
class PopeScores:
    """Scores of one split (or of pooled splits).

    Args:
        split: split name ("pooled" for pooled rows), or None.
        parser: the parser used.
        counts: confusion counts.
        accuracy, precision, recall, f1, yes_ratio, unknown_rate: fractions.
        n_questions: questions in the split; n_missing: of those, without an answer.
        predictions: question_id -> parsed answer ("yes" / "no" / "unknown") of each answered question (the
            per-item output a bootstrap over images regroups); empty for pooled rows.
        complete: True when every question was answered.
    """

    split: str | None
    parser: str
    counts: PopeCounts
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    unknown_rate: float
    n_questions: int
    n_missing: int
    predictions: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.n_missing == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "parser": self.parser,
            **asdict(self.counts),
            "n": self.counts.n,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "yes_ratio": self.yes_ratio,
            "unknown_rate": self.unknown_rate,
            "n_questions": self.n_questions,
            "n_missing": self.n_missing,
            "complete": self.complete,
        }


def count_outcomes(labels: Sequence[str], predictions: Sequence[str]) -> PopeCounts:
    """Confusion counts of labels ("yes" / "no") vs parsed predictions ("yes" / "no" / "unknown")."""
    labels, predictions = list(labels), list(predictions)
    if len(labels) != len(predictions):
        raise EvalInputError(
            f"{len(labels)} labels but {len(predictions)} predictions; pass one parsed prediction per label."
        )
    for index, label in enumerate(labels):
        if not (isinstance(label, str) and label in LABELS):
            raise EvalInputError(f"label {label!r} at position {index} must be 'yes' or 'no'.")
    for index, prediction in enumerate(predictions):
        if not (isinstance(prediction, str) and prediction in PREDICTIONS):
            raise EvalInputError(
                f"prediction {prediction!r} at position {index} must be 'yes', 'no' or 'unknown'; parse raw "
                "answers with pope.parse_answer first."
            )
    tp = fp = tn = fn = unknown = predicted_yes = 0
    for label, prediction in zip(labels, predictions):
        unknown += prediction == UNKNOWN
        predicted_yes += prediction == YES
        if label == YES:
            tp += prediction == YES
            fn += prediction != YES
        else:
            tn += prediction == NO
            fp += prediction != NO
    return PopeCounts(tp, fp, tn, fn, unknown, predicted_yes)


def metrics_from_counts(counts: PopeCounts, split: str | None, parser: str, n_questions: int) -> PopeScores:
    """Accuracy, precision, recall, F1, yes_ratio and unknown_rate of confusion counts."""
    where = f"POPE split {split!r}" if split else "POPE"
    precision = _safe(counts.tp, counts.tp + counts.fp, f"{where}: no 'yes' predictions, precision set to 0")
    recall = _safe(counts.tp, counts.tp + counts.fn, f"{where}: no 'yes' labels, recall set to 0")
    f1 = _safe(2 * precision * recall, precision + recall, f"{where}: precision + recall is 0, F1 set to 0")
    n = counts.n
    return PopeScores(
        split=split,
        parser=parser,
        counts=counts,
        accuracy=_safe(counts.tp + counts.tn, n, f"{where}: no answers, accuracy set to 0"),
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=counts.predicted_yes / n if n else 0.0,
        unknown_rate=counts.unknown / n if n else 0.0,
        n_questions=n_questions,
        n_missing=n_questions - n,
    )


def score_pope(
    questions: Sequence[PopeQuestion],
    answers: Mapping[int, str],
    parser: str = "official",
    split: str | None = None,
) -> PopeScores:
    """Score raw answers against one split's questions.

    Args:
        questions: the split's questions (a non-empty list of `PopeQuestion` with unique ids).
        answers: question_id -> raw decoded answer (unparsed string); may cover only part of the split, but
            not none of it. Ids may be ints or digit strings.
        parser: a name from `PARSERS` (`official` by default).
        split: the split name, for the report.

    Raises:
        EvalInputError: before any answer is parsed, for questions or answers of the wrong kind, an answer
            id without a question (or given twice, as 1 and "1"), an answer that is not a string, or no answer.

    >>> qs = [PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes")]
    >>> score_pope(qs, {1: "Yes, there is."}).accuracy
    1.0
    """
    answer_parser = get_parser(parser)
    questions = _question_list(questions)
    check_unique_ids(questions, f"POPE split {split!r}")
    answers = _answer_map(answers)
    by_id = {q.question_id: q for q in questions}
    stray = sorted(set(answers) - set(by_id))
    if stray:
        raise EvalInputError(
            f"answers for question_id(s) {stray[:10]} have no question in split {split!r}; score each "
            "split's answers against that split's question file."
        )
    _check_answer_texts(answers)
    if not answers:
        raise EvalInputError(
            f"none of the {len(questions)} questions of split {split!r} has an answer; there is nothing to "
            "score. Check that generation ran and wrote its answers."
        )
    answered = [by_id[qid] for qid in sorted(answers)]
    labels = [q.label for q in answered]
    predictions = [answer_parser(answers[q.question_id], q.label) for q in answered]
    scores = metrics_from_counts(count_outcomes(labels, predictions), split, parser, len(questions))
    scores = replace(scores, predictions=MappingProxyType({q.question_id: p for q, p in zip(answered, predictions)}))
    if not scores.complete:
        warnings.warn(
            f"POPE split {split!r}: {scores.n_missing} of {len(questions)} questions have no answer; scored "
            f"the {scores.counts.n} answered ones (complete=False).",
            stacklevel=2,
        )
    return scores


def _question_list(questions: Any) -> list[PopeQuestion]:
    what = "`questions` must be a list of pope.PopeQuestion"
    if hasattr(questions, "questions"):  # a QuestionFile or an HFPopeSplit
        raise EvalInputError(f"{what}, got a {type(questions).__name__}; pass its `.questions`.")
    if isinstance(questions, (str, bytes, Mapping)) or not isinstance(questions, Sequence):
        raise EvalInputError(f"{what}, got {shown(questions)}; read question files with pope.read_questions.")
    for index, question in enumerate(questions):
        if not isinstance(question, PopeQuestion):
            raise EvalInputError(
                f"`questions[{index}]` must be a pope.PopeQuestion, got a {type(question).__name__}; read "
                "question files with pope.read_questions."
            )
    if not questions:
        raise EvalInputError("`questions` is empty; pass the questions of the split that was answered.")
    return list(questions)


def _answer_map(answers: Any) -> dict[int, Any]:
    """`answers` with int keys; a key given twice (1 and "1") raises."""
    if not isinstance(answers, Mapping):
        raise EvalInputError(
            f"`answers` must be a mapping question_id -> answer, got a {type(answers).__name__}; read answer "
            "files with pope.read_answers."
        )
    return int_keyed(answers.items(), "question_id", "`answers`")


def _check_answer_texts(answers: Mapping[int, Any]) -> None:
    bad = sorted(qid for qid, answer in answers.items() if not isinstance(answer, str))
    if bad:
        raise EvalInputError(
            f"answers of question_id(s) {bad[:10]} are not strings ({len(bad)} in all; question_id {bad[0]}: "
            f"{shown(answers[bad[0]])}); an answer is the model's decoded text. Regenerate those answers, or "
            "drop them to score the rest as a partial run."
        )


@dataclass(frozen=True)
class PopeSummary:
    """Per-split scores, their mean F1 and mean accuracy, and all splits pooled as one set."""

    splits: tuple[PopeScores, ...]
    mean_f1: float
    mean_accuracy: float
    pooled: PopeScores

    def to_json(self) -> dict[str, Any]:
        return {
            "splits": {s.split: s.to_json() for s in self.splits},
            "mean_f1": self.mean_f1,
            "mean_accuracy": self.mean_accuracy,
            "pooled": self.pooled.to_json(),
        }


def summarize_pope(scores: Sequence[PopeScores]) -> PopeSummary:
    """Mean F1 / accuracy over the splits run (LLaVA-1.5 reports mean F1) and the pooled scores."""
    if not scores:
        raise EvalInputError("`scores` is empty; pass the PopeScores of at least one split.")
    parsers = {s.parser for s in scores}
    if len(parsers) > 1:
        raise EvalInputError(f"splits were scored with different parsers {sorted(parsers)}; use one parser.")
    counts = PopeCounts()
    for s in scores:
        counts = counts + s.counts
    pooled = metrics_from_counts(counts, "pooled", scores[0].parser, sum(s.n_questions for s in scores))
    return PopeSummary(
        splits=tuple(scores),
        mean_f1=sum(s.f1 for s in scores) / len(scores),
        mean_accuracy=sum(s.accuracy for s in scores) / len(scores),
        pooled=pooled,
    )


def read_answers(path: PathLike, answer_key: str = "text", id_key: str = "question_id") -> dict[int, str]:
    """Raw answers (JSON Lines or array of objects, e.g. LLaVA's answer files) as question_id -> answer.

    An empty file, a record without the keys, a bad or repeated id, or an answer that is not a string (JSON
    null) raises, naming the file and the record.
    """
    answers: dict[int, str] = {}
    for number, row in enumerate(read_records(path, "POPE answer"), start=1):
        where = f"POPE answer file {str(path)!r}, record {number}"
        if not isinstance(row, dict) or id_key not in row or answer_key not in row:
            raise EvalInputError(
                f"{where}, needs the keys {id_key!r} and {answer_key!r}; set id_key / answer_key to the keys "
                "your file uses."
            )
        try:
            question_id = as_id(row[id_key], "question_id")
        except EvalInputError as err:
            raise EvalInputError(f"{where}: {err}") from None
        if question_id in answers:
            raise EvalInputError(
                f"POPE answer file {str(path)!r} answers question_id {question_id} twice (record {number}); "
                "keep one answer per question."
            )
        if not isinstance(row[answer_key], str):
            raise EvalInputError(
                f"{where}: the answer to question_id {question_id} must be a string, got {shown(row[answer_key])}; "
                "regenerate it, or drop the record to score the rest as a partial run."
            )
        answers[question_id] = row[answer_key]
    return answers


def _safe(numerator: float, denominator: float, message: str) -> float:
    if denominator:
        return numerator / denominator
    warnings.warn(message, stacklevel=3)
    return 0.0
