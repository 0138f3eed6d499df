"""vlmfix.validation: the one argument-check helper every constructor uses."""

from __future__ import annotations

import math

import pytest

from vlmfix import validation as check


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        ("0.1", {"low": 0, "high": 1}, r"`x` must be a finite number in \[0, 1\], got '0.1' \(a str\)"),
        (True, {}, r"`x` must be a finite number, got True \(a bool\)"),
        (math.nan, {"low": 0}, r"`x` must be a finite number >= 0, got nan\."),
        (math.inf, {}, r"got inf\."),
        (0.0, {"low": 0, "low_open": True}, r"`x` must be a finite number > 0, got 0\.0\."),
        (1.0, {"high": 1, "high_open": True}, r"< 1, got 1\.0"),
        (2.5, {"integer": True}, r"`x` must be an int, got 2\.5 \(a float\)"),
        (3, {"integer": True, "low": 5}, r"`x` must be an int >= 5, got 3\."),
    ],
)
def test_number_refuses_with_the_value_and_the_requirement(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check.number(value, "x", **kwargs)


def test_number_accepts_and_converts():
    assert check.number(1, "x", low=0, high=1) == 1.0 and isinstance(check.number(1, "x"), float)
    assert check.number(7, "x", integer=True) == 7 and isinstance(check.number(7, "x", integer=True), int)
    assert check.number(math.inf, "x", finite=False) == math.inf
    assert check.optional_number(None, "x", low=0) is None


def test_meaning_is_appended_in_the_house_style():
    with pytest.raises(ValueError, match=r"^`p` must be a finite number in \[0, 1\], got 1\.4; p is the fraction "
                                         r"of sink mass moved\.$"):
        check.number(1.4, "p", low=0, high=1, meaning="the fraction of sink mass moved")
    with pytest.raises(ValueError, match=r"`beta` must be None or a finite number in \(0, 1\], got '1' \(a str\)"):
        check.optional_number("1", "beta", low=0, high=1, low_open=True)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_boolean_refuses_everything_but_a_bool(value):
    with pytest.raises(ValueError, match=r"`flag` must be True or False"):
        check.boolean(value, "flag")
    assert check.boolean(False, "flag") is False


def test_choice_lists_the_options():
    with pytest.raises(ValueError, match=r"`mode` must be one of 'a', 'b', got 'c'\."):
        check.choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"one of True, False"):
        check.choice(1, "x", (True, False))  # 1 == True, but it is not the bool
    assert check.choice("b", "mode", ("a", "b")) == "b"


def test_sequences_and_indices():
    assert check.indices([3, 1], "layers") == (3, 1)
    assert check.indices(None, "layers") is None
    with pytest.raises(ValueError, match=r"`layers` must be None or a non-empty list of 0-based layer indices, "
                                         r"got 5 \(an int\)"):
        check.indices(5, "layers")
    with pytest.raises(ValueError, match=r"distinct 0-based layer indices, got \[1, 1\]"):
        check.indices([1, 1], "layers")
    with pytest.raises(ValueError, match=r"`layers\[1\]` must be an int >= 0, got -2\."):
        check.indices([1, -2], "layers")
    with pytest.raises(ValueError, match=r"non-empty list of 0-based layer indices, got '12' \(a str\)"):
        check.indices("12", "layers")

    def positive(x, name):
        return check.number(x, name, low=0, low_open=True)

    assert check.sequence([1, 2.5, 3], "std", positive, length=3, what="floats") == (1.0, 2.5, 3.0)
    with pytest.raises(ValueError, match=r"`std` must be a list of 3 floats, got \[1, 2\]"):
        check.sequence([1, 2], "std", positive, length=3, what="floats")
    with pytest.raises(ValueError, match=r"`std\[2\]` must be a finite number > 0, got nan"):
        check.sequence([1, 2, math.nan], "std", positive, length=3, what="floats")


def test_text_and_function():
    assert check.text("a", "name") == "a"
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string, got ''"):
        check.text("", "name")
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string, got 3 \(an int\)"):
        check.text(3, "name")
    with pytest.raises(ValueError, match=r"`selector` must be a callable \(model, inputs\) -> \(local, summary\)"):
        check.function(4, "selector", "(model, inputs) -> (local, summary)")
