"""Toy miniatures of AMBER, MME and HallusionBench (hallu_benchmarks.md Part E): same seed, same bytes; every
file loads with the real loaders; the box rules (contact, left of) on a fixture counted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmfix.eval import amber, hallusion, mme
from vlmfix.toy.bench import ToyObject, ToyScene, in_contact, left_question, position_pair, write_miniatures
from vlmfix.toy.categories import PAIRS


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmfix.toy.dataset import generate_split, write_split

    root = tmp_path_factory.mktemp("toy_data")
    write_split(root, "val", generate_split("val", 16, 1, seed=0, image_size=112, pair_keep=0.98, broken_share=0.5))
    return root


def test_same_seed_same_bytes_and_reuse(toy_data: Path, tmp_path: Path) -> None:
    a = write_miniatures(toy_data, tmp_path / "a")
    b = write_miniatures(toy_data, tmp_path / "b")
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_a == meta_b and meta_a["files"]
    for relative in meta_a["files"]:
        assert (a / relative).read_bytes() == (b / relative).read_bytes()
    stamp = (a / "meta.json").stat().st_mtime_ns
    write_miniatures(toy_data, a)  # same key: reused, not rewritten
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    other = json.loads((write_miniatures(toy_data, tmp_path / "c", seed=1) / "meta.json").read_text())
    assert other["files"] != meta_a["files"]  # the seed picks the absent objects and colours


def test_every_miniature_loads_with_the_real_loaders(toy_data: Path, tmp_path: Path) -> None:
    out = write_miniatures(toy_data, tmp_path / "mini")
    data = amber.load_amber(out / "amber")
    generative = data.queries("generative")
    assert generative and all(data.image_path(q).is_file() for q in generative)
    types = [e.type for e in data.entries]
    # AMBER's order: generative, attribute, existence, relation
    order = ["generative", "discriminative-attribute-state", "discriminative-attribute-number",
             "discriminative-hallucination", "discriminative-relation", "relation"]
    assert [order.index(t) for t in types] == sorted(order.index(t) for t in types)
    assert all(e.truth == "no" for e in data.entries if e.type == "discriminative-hallucination")
    # a description naming exactly the truth objects hallucinates nothing and covers everything
    perfect = {q.id: "A " + " and a ".join(data.entry(q.id).truth) + "." for q in generative}
    scores = amber.score_generative(perfect, data, amber.SimpleNouns(), amber.NoSimilarity())
    assert (scores.chair, scores.cover, scores.hal) == (0.0, 1.0, 0.0)
    questions = mme.load_mme_folder(out / "mme")
    assert {q.subtask for q in questions} == {"existence", "count", "position", "color"}
    assert all(q.question.endswith(" Please answer yes or no.") for q in questions)
    bench = hallusion.load_hallusion(out / "hallusionbench")
    assert all(q.image_path is None or q.image_path.is_file() for q in bench)
    assert sum(q.image_path is None for q in bench) == len(PAIRS)  # one text-only question per pair
    edits = [q for q in bench if q.subcategory == "toy_edit"]
    assert len(edits) % 4 == 0 and {q.visual_input for q in edits} == {"1", "2"}


def test_box_rules_on_a_fixture() -> None:
    dog = ToyObject("dog", (10, 10, 20, 20))       # x 10..30, centre 20
    frisbee = ToyObject("frisbee", (28, 10, 20, 20))  # x 28..48, centre 38: 2 px overlap, 18 px right
    assert in_contact(dog, frisbee)
    assert not in_contact(dog, ToyObject("frisbee", (30, 10, 20, 20)))  # touching edges share no area
    scene = ToyScene(1, Path("x.png"), (frisbee, dog))
    assert left_question(*position_pair(scene)) == "Is the dog on the left of the frisbee?"  # type: ignore[misc]
    assert position_pair(ToyScene(1, Path("x.png"), (dog, ToyObject("cat", (14, 40, 20, 20))))) is None  # 4 px
