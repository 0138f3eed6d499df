"""POPE answer parsers (spec B5): raw model answer -> "yes", "no" or "unknown".

This module is the single place answer parsers live (the `PARSERS` registry). Every parser takes a string
(anything else raises) and first strips surrounding whitespace (as LLaVA's answer writer does). `official`
is the default.

* `official` (default): text before the first "."; delete ","; split on single spaces; "no" if a token is
  "No", "not" or "no", else "yes" (case-sensitive, never unknown). RUCAIBox/POPE `evaluate.py`, LLaVA
  `eval_pope.py`.
* `opera`: delete every "." and ","; split the whole answer on single spaces; "no" if a token is No, not, no,
  NO or ends in "n't", else "yes". OPERA `pope_eval.py`, PAI `pope_ans.py`.
* `vcd_substring`: lower-case; label yes -> "yes" iff "yes" is a substring; label no -> "no" iff "no" is a
  substring ("snowboard", "know" count). Needs the label; inflates scores; compatibility only. VCD
  `eval_pope.py`.
* `exact`: lower-case; "yes" / "no" on exact match, else unknown. lmms-eval `pope/utils.py`.
* `yesno_words`: lower-case, punctuation -> spaces, split; "yes" if "yes" is a word and "no" is not, "no" if
  the reverse, else unknown. VLMEvalKit `yorn.py` without the LLM judge.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

from vlmfix.eval._io import shown
from vlmfix.eval.errors import EvalInputError
from vlmfix.registry import Registry

YES, NO, UNKNOWN = "yes", "no", "unknown"
_PUNCTUATION = str.maketrans({char: " " for char in string.punctuation})


@dataclass(frozen=True)
class AnswerParser:
    """A named answer rule. `needs_label` parsers read the question's label (only `vcd_substring`)."""

    name: str
    rule: Callable[[str, str | None], str]
    needs_label: bool = False

    def __call__(self, answer: str, label: str | None = None) -> str:
        if not isinstance(answer, str):
            raise EvalInputError(
                f"POPE answers must be strings, got {shown(answer)}; an answer is the model's decoded text "
                "(None is a failed generation: regenerate it)."
            )
        if self.needs_label and label not in (YES, NO):
            raise EvalInputError(
                f"POPE parser {self.name!r} decides by the question's label; pass label='yes' or 'no', got "
                f"{label!r}."
            )
        return self.rule(answer.strip(), label)


PARSERS: Registry[AnswerParser] = Registry("POPE answer parser (pope.parser)")


def _register(
    name: str, needs_label: bool = False
) -> Callable[[Callable[[str, str | None], str]], AnswerParser]:
    def add(rule: Callable[[str, str | None], str]) -> AnswerParser:
        parser = AnswerParser(name, rule, needs_label)
        PARSERS.register(name)(parser)
        return parser

    return add


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
    words = set(answer.lower().translate(_PUNCTUATION).split())
    if "yes" in words and "no" not in words:
        return YES
    if "no" in words and "yes" not in words:
        return NO
    return UNKNOWN


def get_parser(name: str = "official") -> AnswerParser:
    """The parser registered under `name`; an unknown name raises and lists the available ones."""
    return PARSERS.get(name)


def parse_answer(answer: str, parser: str = "official", label: str | None = None) -> str:
    """Parse one raw answer with a named parser.

    >>> parse_answer("No, there is not."), parse_answer("NO"), parse_answer("NO", "opera")
    ('no', 'yes', 'no')
    """
    return get_parser(parser)(answer, label)
