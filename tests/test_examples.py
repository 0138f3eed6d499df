"""Every `>>>` example in vlmfix's docstrings runs (and prints what it says it prints).

Examples on the toy model need the fast toy build (cached after the first build), so they are slow;
DCD's example needs projectors trained on the fast toy, trained here for two steps first.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vlmfix

TOY_MARKER = "vlmfix.toy.load_example"
OPTIONAL_DEPENDENCIES = {"lmms_eval"}  # extras outside [all]: modules needing them are walked only where installed


def all_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for info in pkgutil.walk_packages(vlmfix.__path__, prefix="vlmfix."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as error:
            if error.name in OPTIONAL_DEPENDENCIES:
                continue
            raise
        tests += [t for t in finder.find(module) if t.examples and t.name.startswith(info.name)]
    return sorted(tests, key=lambda t: t.name)


def uses_toy(test: doctest.DocTest) -> bool:
    return any(TOY_MARKER in example.source for example in test.examples)


EXAMPLES = all_examples()


def run(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)


def test_examples_are_found():
    names = {t.name for t in EXAMPLES}
    assert {"vlmfix.methods.pai.PAI", "vlmfix.methods.dcd.DCD", "vlmfix.eval.chair.score.score_chair"} <= names


@pytest.mark.parametrize("test", [t for t in EXAMPLES if not uses_toy(t)], ids=lambda t: t.name)
def test_example_runs(test):
    run(test)


@pytest.mark.slow
@pytest.mark.parametrize("test", [t for t in EXAMPLES if uses_toy(t)], ids=lambda t: t.name)
def test_toy_example_runs(test, tmp_path, monkeypatch):
    if test.name == "vlmfix.methods.dcd.DCD":
        from vlmfix.training.dcd import DCDTrainConfig, train_dcd

        monkeypatch.chdir(tmp_path)  # the example reads outputs/dcd/toy_fast relative to the working dir
        train_dcd(DCDTrainConfig(model="toy_fast", output_dir="outputs/dcd/toy_fast", max_steps=2, batch_size=2,
                                 gradient_accumulation_steps=1, max_rows=8))
    run(test)
