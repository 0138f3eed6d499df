"""The `torchvision` marker: CI's main lane deselects it, the second lane runs it; without torchvision a marked
test fails with the fix named, never skips."""

from __future__ import annotations

import importlib.util

import pytest

import tests.conftest as suite_conftest
from vlmfix.testing import require_torchvision

pytest_plugins = ["pytester"]

CONFTEST = "from tests.conftest import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401\n"


@pytest.fixture(autouse=True)
def unsharded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner pytest runs load the suite's collection hook, which would keep one shard of their tests only."""
    monkeypatch.delenv("VLMFIX_TEST_SHARD", raising=False)


@pytest.fixture
def no_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision looks missing (to `importlib.util.find_spec`), whether or not it is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "torchvision" else real(name, *args, **kwargs))


def test_a_missing_torchvision_is_named_with_the_fix(no_torchvision):
    with pytest.raises(RuntimeError, match=r"the x build needs torchvision.*torchvision==0\.29\.1.*not torchvision"):
        require_torchvision("the x build")


def test_a_marked_test_fails_without_torchvision(pytester, no_torchvision):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("import pytest\n\n@pytest.mark.torchvision\ndef test_needs_it():\n    pass\n\n"
                        "def test_plain():\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, errors=1)  # the marked one fails at setup; nothing is skipped
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*test_needs_it (marked torchvision) needs torchvision*"])


def test_a_torchvision_family_parameter_is_marked(pytester, monkeypatch):
    """A test parametrized on a family of TORCHVISION_FAMILIES carries the mark, so `-m "not torchvision"` (the main
    lane) leaves it out and `-m torchvision` (the second lane) runs it alone."""
    monkeypatch.setattr(suite_conftest, "TORCHVISION_FAMILIES", ("needs_tv",))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("import pytest\n\n@pytest.mark.parametrize('family', ['plain', 'needs_tv'])\n"
                        "def test_family(family):\n    pass\n")
    pytester.runpytest_inprocess("-m", "not torchvision").assert_outcomes(passed=1, deselected=1)
    selected = pytester.runpytest_inprocess("-m", "torchvision", "-v")
    selected.stdout.fnmatch_lines(["*test_family?needs_tv? *"])
    assert selected.parseoutcomes()["deselected"] == 1  # the plain case left out (the marked one fails here)


def test_a_torchvision_family_build_names_the_fix(no_torchvision):
    """Outside the marker too (a script, the --table command): the build stops before importing any model code."""
    from vlmfix.testing import TORCHVISION_FAMILIES, build_tiny

    for family in TORCHVISION_FAMILIES:
        with pytest.raises(RuntimeError, match=rf"the tiny {family} build needs torchvision"):
            build_tiny(family)
