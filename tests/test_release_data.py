"""Checks against the real upstream releases, run where they are on disk (VLMFIX_AMBER, VLMFIX_HALLUSIONBENCH,
VLMFIX_POPE); the data cannot ship with vlmfix. The expected counts are the spec's (hallu_benchmarks.md A1, C1,
C2, Part D), counted there from the released files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from vlmfix.eval import amber, hallusion, pope


def release(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: this check needs the released files on disk")
    return Path(value)


def test_amber_release_counts() -> None:
    data = amber.load_amber(release("VLMFIX_AMBER"))
    assert len(data.entries) == 15220 and len(data.vocabulary) == 418 and len(data.association) == 340
    assert Counter(e.type for e in data.entries) == {
        "generative": 1004, "discriminative-attribute-state": 4764, "discriminative-attribute-number": 2072,
        "discriminative-attribute-action": 792, "discriminative-hallucination": 4924, "discriminative-relation": 975,
        "relation": 689}
    generative = [e for e in data.entries if e.generative]
    assert (sum(len(e.truth) for e in generative), sum(len(e.hallu) for e in generative)) == (5599, 4924)
    assert data.safe_words == {"orange", "snack", "line", "camera", "light", "shoe", "sign", "range", "individual"}


def test_hallusionbench_release_grouping() -> None:
    questions = hallusion.load_hallusion(release("VLMFIX_HALLUSIONBENCH"))
    assert len(questions) == 1129 and sum(q.image_path is None for q in questions) == 178
    assert len({q.figure_key for q in questions if not q.no_visual}) == 346
    groups = Counter(q.group_key for q in questions)
    assert Counter(groups.values()) == {1: 3, 2: 256, 3: 170, 4: 26}
    easy = Counter(q.group_key for q in questions if q.visual_input != "2")
    hard = Counter(q.group_key for q in questions if q.visual_input == "2")
    assert (len(easy), sum(easy.values()), len(hard), sum(hard.values())) == (455, 625, 430, 504)


@pytest.mark.parametrize("dataset", pope.DATASETS)
@pytest.mark.parametrize("split", pope.SPLITS)
def test_pope_release_files_are_pinned(dataset: str, split: str) -> None:
    path = pope.find_question_file(release("VLMFIX_POPE"), dataset, split)
    loaded = pope.load_question_file(path, split=split, dataset=dataset)
    assert loaded.versions and loaded.dataset == dataset
