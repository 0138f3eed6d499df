"""The one registry of yes/no answer parsers (spec Part 0), shared by POPE, AMBER, MME and HallusionBench.

A parser maps a raw model answer to "yes", "no" or "unknown". Every parser takes a string (anything else
raises); most first strip surrounding whitespace (as LLaVA's answer writer does), `mme_official` reads the
text as given (its 4-character prefix rule sees leading spaces). Each benchmark names its default; any
parser works with any benchmark, and the name goes into the fingerprint.

POPE's parsers (spec chair_pope.md B5; names unchanged):

* `official` (POPE's default): text before the first "."; delete ","; split on single spaces; "no" if a
  token is "No", "not" or "no", else "yes" (case-sensitive, never unknown). RUCAIBox/POPE `evaluate.py`,
  LLaVA `eval_pope.py`.
* `opera`: delete every "." and ","; split the whole answer on single spaces; "no" if a token is No, not,
  no, NO or ends in "n't", else "yes". OPERA `pope_eval.py`, PAI `pope_ans.py`.
* `vcd_substring`: lower-case; label yes -> "yes" iff "yes" is a substring; label no -> "no" iff "no" is a
  substring ("snowboard", "know" count). Needs the label; inflates scores; compatibility only.
* `exact`: lower-case; "yes" / "no" on exact match, else unknown. lmms-eval `pope/utils.py`.
* `yesno_words`: lower-case, punctuation -> spaces, split; "yes" if "yes" is a word and "no" is not, "no"
  if the reverse, else unknown.

The other benchmarks' parsers:

* `amber_exact` (AMBER's default): the stripped text must be exactly "Yes" or "No" (case-sensitive);
  anything else is unknown (AMBER `inference.py` counts it wrong and not as an answered No).
* `mme_official` (MME's default): lower-case (no strip); exactly "yes"/"no" -> that; else the first 4
  characters: containing "yes" -> yes, else containing "no" -> no, else unknown ("other"). MME
  `eval_tool/calculation.py`.
* `mme_lmms`: lower-case, strip, delete "."; "yes"/"no" exactly; a lone "y"/"n" -> yes/no; else the same
  4-character prefix rule. lmms-eval `tasks/mme/utils.py`.
* `lmms_substring`: lower-case; "yes" anywhere -> yes, else "no" anywhere -> no, else unknown. lmms-eval
  `amber_g` utils (its discriminative path).
* `vlmevalkit_yorn` (HallusionBench's default): VLMEvalKit's `YOrN_Extraction` with `process_punctuation`,
  ported exactly: lower-case; each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when a space
  touches it somewhere in the text (or a digit,digit pattern exists), else becomes a space; periods not
  followed by a digit go (at most 32 of them: upstream passes `re.UNICODE` as the count); apostrophes and
  colons stay; "yes" iff "yes" is a word and "no" is not, "no" for the reverse, else unknown.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlmfix.eval._io import shown
from vlmfix.eval.errors import EvalInputError
from vlmfix.registry import Registry

YES, NO, UNKNOWN = "yes", "no", "unknown"
PREDICTIONS = (YES, NO, UNKNOWN)
_PUNCTUATION = str.maketrans({char: " " for char in string.punctuation})


@dataclass(frozen=True)
class AnswerParser:
    """A named answer rule. `needs_label` parsers read the question's label (only `vcd_substring`);
    `strip` parsers see the answer without surrounding whitespace."""

    name: str
    rule: Callable[[str, str | None], str]
    needs_label: bool = False
    strip: bool = True

    def __call__(self, answer: str, label: str | None = None) -> str:
        if not isinstance(answer, str):
            raise EvalInputError(
                f"yes/no answers must be strings, got {shown(answer)}; an answer is the model's decoded text "
                "(None is a failed generation: regenerate it)."
            )
        if self.needs_label and label not in (YES, NO):
            raise EvalInputError(
                f"answer parser {self.name!r} decides by the question's label; pass label='yes' or 'no', got "
                f"{label!r}."
            )
        return self.rule(answer.strip() if self.strip else answer, label)


PARSERS: Registry[AnswerParser] = Registry("yes/no answer parser")


def _register(
    name: str, needs_label: bool = False, strip: bool = True
) -> Callable[[Callable[[str, str | None], str]], AnswerParser]:
    def add(rule: Callable[[str, str | None], str]) -> AnswerParser:
        parser = AnswerParser(name, rule, needs_label, strip)
        PARSERS.register(name)(parser)
        return parser

    return add


# ------------------------------------------------------------------ POPE's
@_register("official")
def _official(answer: str, label: str | None) -> str:
    words = answer.split(".")[0].replace(",", "").split(" ")
    return NO if any(word in ("No", "not", "no") for word in words) else YES


@_register("opera")
def _opera(answer: str, label: str | None) -> str:
    words = answer.replace(".", "").replace(",", "").split(" ")
    return NO if any(word in ("No", "not", "no", "NO") or word.endswith("n't") for word in words) else YES


@_register("vcd_substring", needs_label=True)
def _vcd_substring(answer: str, label: str | None) -> str:
    text = answer.lower()
    if label == YES:
        return YES if "yes" in text else NO
    return NO if "no" in text else YES


@_register("exact")
def _exact(answer: str, label: str | None) -> str:
    text = answer.lower()
    return text if text in (YES, NO) else UNKNOWN


@_register("yesno_words")
def _yesno_words(answer: str, label: str | None) -> str:
    return _word_vote(answer.lower().translate(_PUNCTUATION).split())


# ------------------------------------------------------------------ AMBER, MME, HallusionBench, lmms-eval
@_register("amber_exact")
def _amber_exact(answer: str, label: str | None) -> str:
    return {"Yes": YES, "No": NO}.get(answer, UNKNOWN)


@_register("mme_official", strip=False)
def _mme_official(answer: str, label: str | None) -> str:
    text = answer.lower()
    return text if text in (YES, NO) else _prefix_rule(text)


@_register("mme_lmms")
def _mme_lmms(answer: str, label: str | None) -> str:
    text = answer.lower().strip().replace(".", "")
    if text in (YES, NO):
        return text
    if len(text) == 1:
        return {"y": YES, "n": NO}.get(text, UNKNOWN)
    return _prefix_rule(text)


@_register("lmms_substring")
def _lmms_substring(answer: str, label: str | None) -> str:
    text = answer.lower()
    return YES if "yes" in text else NO if "no" in text else UNKNOWN


@_register("vlmevalkit_yorn")
def _vlmevalkit_yorn(answer: str, label: str | None) -> str:
    return _word_vote(process_punctuation(answer.lower()).split())


def _prefix_rule(text: str) -> str:
    prefix = text[:4]
    return YES if "yes" in prefix else NO if "no" in prefix else UNKNOWN


def _word_vote(words: Sequence[str]) -> str:
    if YES in words and NO not in words:
        return YES
    if NO in words and YES not in words:
        return NO
    return UNKNOWN


_YORN_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                     ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # upstream's pattern as written (a lookahead, not a lookbehind)
_UPSTREAM_PERIOD_COUNT = int(re.UNICODE)  # upstream passes the flag where `count` goes: 32


def process_punctuation(text: str) -> str:
    """VLMEvalKit's `process_punctuation`, behaviour for behaviour (see the module docstring).

    >>> process_punctuation("yes, it is (mostly).")
    'yes it is mostly '
    """
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _YORN_PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_UPSTREAM_PERIOD_COUNT)


def get_parser(name: str = "official") -> AnswerParser:
    """The parser registered under `name`; an unknown name raises and lists the available ones."""
    return PARSERS.get(name)


def parse_answer(answer: str, parser: str = "official", label: str | None = None) -> str:
    """Parse one raw answer with a named parser.

    >>> parse_answer("No, there is not."), parse_answer("NO"), parse_answer("NO", "opera")
    ('no', 'yes', 'no')
    """
    return get_parser(parser)(answer, label)


def check_predictions(predictions: Sequence[Any]) -> None:
    """Every prediction must be "yes", "no" or "unknown" (parsed answers, not raw text)."""
    for index, prediction in enumerate(predictions):
        if not (isinstance(prediction, str) and prediction in PREDICTIONS):
            raise EvalInputError(
                f"prediction {prediction!r} at position {index} must be 'yes', 'no' or 'unknown'; parse raw "
                "answers with vlmfix.eval.yesno.parse_answer first."
            )


@dataclass(frozen=True)
class AnswerRates:
    """What every yes/no result reports besides its metrics: the share of unparseable answers and the share
    of answers parsed as yes (from predictions, never from labels; it has no "better" direction)."""

    n: int
    unknown: int
    predicted_yes: int

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.n if self.n else 0.0

    @property
    def yes_ratio(self) -> float:
        return self.predicted_yes / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "unknown_rate": self.unknown_rate, "yes_ratio": self.yes_ratio}


def answer_rates(predictions: Sequence[str]) -> AnswerRates:
    """The unknown rate and predicted yes ratio of parsed predictions.

    >>> answer_rates(["yes", "no", "unknown", "yes"]).to_json()
    {'n': 4, 'unknown_rate': 0.25, 'yes_ratio': 0.5}
    """
    check_predictions(predictions)
    return AnswerRates(len(predictions), sum(p == UNKNOWN for p in predictions), sum(p == YES for p in predictions))
