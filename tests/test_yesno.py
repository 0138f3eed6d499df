"""The shared yes/no parser registry (spec Part 0): each benchmark's parser on the spec's cases and on cases of
our own, POPE's names kept, and the unknown rate / predicted yes ratio counted by hand."""

from __future__ import annotations

import pytest

from vlmfix.eval import pope, yesno
from vlmfix.eval.errors import EvalInputError

CASES = [
    # AMBER: exactly "Yes" / "No" after stripping, case-sensitive (inference.py 188-190)
    ("amber_exact", "Yes", "yes"),
    ("amber_exact", " No\n", "no"),
    ("amber_exact", "No.", "unknown"),
    ("amber_exact", "yes", "unknown"),
    ("amber_exact", "Yes, there is.", "unknown"),
    # MME official: lower-case, exact, else the first four characters (calculation.py)
    ("mme_official", "Not sure", "no"),
    ("mme_official", "None", "no"),
    ("mme_official", "Nothing", "no"),
    ("mme_official", "Noted, yes", "no"),
    ("mme_official", " yes", "yes"),
    ("mme_official", "Y", "unknown"),
    ("mme_official", "I think yes", "unknown"),
    ("mme_official", "No.", "no"),
    ("mme_official", "There is a cat.", "unknown"),
    ("mme_official", "  yes", "unknown"),  # no strip: the prefix is "  ye"
    # MME lmms-eval: strip, drop ".", lone y / n
    ("mme_lmms", "Y", "yes"),
    ("mme_lmms", "n.", "no"),
    ("mme_lmms", "No.", "no"),
    ("mme_lmms", "  yes", "yes"),
    ("mme_lmms", "x", "unknown"),
    ("mme_lmms", "I think yes", "unknown"),
    # lmms-eval substring: yes anywhere first, then no anywhere
    ("lmms_substring", "Yes and no", "yes"),
    ("lmms_substring", "I know", "no"),
    ("lmms_substring", "Maybe", "unknown"),
    # VLMEvalKit YOrN_Extraction (spec C5)
    ("vlmevalkit_yorn", "Yes, the circles are equal.", "yes"),
    ("vlmevalkit_yorn", "NO.", "no"),
    ("vlmevalkit_yorn", "Yes and no", "unknown"),
    ("vlmevalkit_yorn", "Yes,no", "unknown"),
    ("vlmevalkit_yorn", "Nope", "unknown"),
    ("vlmevalkit_yorn", "I don't know", "unknown"),
    ("vlmevalkit_yorn", "'yes'", "unknown"),
    ("vlmevalkit_yorn", "Yes: it is", "unknown"),
    ("vlmevalkit_yorn", "3.5 yes", "yes"),
    ("vlmevalkit_yorn", "(no)", "no"),
]


@pytest.mark.parametrize(("parser", "answer", "expected"), CASES)
def test_each_parser_on_its_cases(parser: str, answer: str, expected: str) -> None:
    assert yesno.parse_answer(answer, parser) == expected


def test_yesno_words_and_yorn_differ_on_the_colon() -> None:
    # POPE's yesno_words turns ":" into a space; VLMEvalKit keeps it, so "yes:" is not the word "yes".
    assert yesno.parse_answer("Yes: it is", "yesno_words") == "yes"
    assert yesno.parse_answer("Yes: it is", "vlmevalkit_yorn") == "unknown"


def test_process_punctuation_follows_upstream() -> None:
    # "," touches a space somewhere, so every "," is deleted; "/" touches none, so it becomes a space.
    assert yesno.process_punctuation("a,b, c/d") == "ab c d"
    # a digit,digit pattern anywhere deletes every mark; the period before a digit stays.
    assert yesno.process_punctuation("1,000 a/b 2.5.") == "1000 ab 2.5"
    # upstream's count=re.UNICODE removes at most 32 periods
    assert yesno.process_punctuation("." * 40) == "." * 8


def test_pope_names_are_the_same_parsers() -> None:
    for name in ("official", "opera", "vcd_substring", "exact", "yesno_words"):
        assert pope.get_parser(name) is yesno.get_parser(name)
    assert pope.PARSERS is yesno.PARSERS


def test_answer_rates_counted_by_hand() -> None:
    # 5 answers: 2 parsed yes, 1 no, 2 unknown -> unknown_rate 2/5, yes_ratio 2/5
    rates = yesno.answer_rates(["yes", "unknown", "no", "yes", "unknown"])
    assert (rates.n, rates.unknown_rate, rates.yes_ratio) == (5, 0.4, 0.4)
    assert yesno.answer_rates([]).to_json() == {"n": 0, "unknown_rate": 0.0, "yes_ratio": 0.0}
    with pytest.raises(EvalInputError, match="prediction 'Yes' at position 0 must be 'yes', 'no' or 'unknown'"):
        yesno.answer_rates(["Yes"])


def test_non_string_answer_is_refused() -> None:
    with pytest.raises(EvalInputError, match=r"yes/no answers must be strings, got None"):
        yesno.parse_answer(None, "amber_exact")  # type: ignore[arg-type]
