"""POPE on A-OKVQA and GQA (spec Part D): files identified by the content of their rows, not their bytes
(array vs JSON Lines, CRLF vs LF), both repository layouts found, and the pinned content hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmfix.eval import pope
from vlmfix.eval.errors import EvalInputError

# 2 images x (3 yes then 3 no), as the SEEM-based files order them
OBJECTS = {"a.jpg": ["dog", "cat", "sofa", "car", "kite", "bus"],
           "b.jpg": ["cup", "fork", "pizza", "bed", "tie", "cow"]}
ROWS = [{"question_id": 6 * i + j + 1, "image": image, "text": f"Is there a {name} in the image?",
         "label": "yes" if j < 3 else "no"}
        for i, (image, names) in enumerate(OBJECTS.items()) for j, name in enumerate(names)]


def test_array_and_json_lines_have_one_content_hash(tmp_path: Path) -> None:
    array = tmp_path / "gqa_pope_seem_random.json"
    array.write_text(json.dumps(ROWS))
    lines = tmp_path / "gqa_pope_random.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    crlf = tmp_path / "crlf.json"
    crlf.write_bytes("".join(json.dumps(r) + "\r\n" for r in ROWS).encode())
    with pytest.warns(UserWarning, match="not one of the pinned released files"):
        loaded = [pope.load_question_file(p) for p in (array, lines, crlf)]
    assert len({f.content_sha256 for f in loaded}) == 1
    assert len({f.sha256 for f in loaded}) == 3


def test_content_pin_classifies_every_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    questions = [pope.PopeQuestion(**row) for row in ROWS]
    pins = {pope.questions_sha256(questions): pope.PinnedPopeFile("random", ("9b54106", "head"), 12, "gqa")}
    monkeypatch.setattr("vlmfix.eval.pope.questions.CONTENT_PINS", pins)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS))
    crlf = tmp_path / "b.json"
    crlf.write_bytes("".join(json.dumps(r) + "\r\n" for r in ROWS).encode())
    for path in (array, crlf):
        loaded = pope.load_question_file(path, split="random", dataset="gqa")
        assert (loaded.split, loaded.dataset, loaded.versions) == ("random", "gqa", ("9b54106", "head"))
    with pytest.raises(EvalInputError, match="is the released gqa 'random' file, but dataset='aokvqa'"):
        pope.load_question_file(array, dataset="aokvqa")
    with pytest.raises(EvalInputError, match="but split='popular' was asked for"):
        pope.load_question_file(array, split="popular")


def test_grouped_file_scores_like_its_alternating_permutation() -> None:
    grouped = [pope.PopeQuestion(**row) for row in ROWS]
    order = [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]  # yes, no, yes, no, ... per image
    alternating = [grouped[i] for i in order]
    answers = {q.question_id: "Yes" if q.question_id % 4 else "No" for q in grouped}
    a = pope.score_pope(grouped, answers)
    b = pope.score_pope(alternating, answers)
    assert a.to_json() == b.to_json()
    # labels yes: ids 1-3, 7-9; answered No: ids 4, 8, 12 -> TP 5 (1,2,3,7,9), FN 1 (8), TN 2 (4, 12), FP 4
    assert (a.counts.tp, a.counts.fn, a.counts.tn, a.counts.fp) == (5, 1, 2, 4)


def test_both_layouts_are_found(tmp_path: Path) -> None:
    rucaibox = tmp_path / "POPE" / "output" / "seem" / "aokvqa" / "aokvqa_pope_seem_popular.json"
    vcd = tmp_path / "VCD" / "experiments" / "data" / "POPE" / "gqa" / "gqa_pope_adversarial.json"
    for path in (rucaibox, vcd):
        path.parent.mkdir(parents=True)
        path.write_text("[]")
    assert pope.find_question_file(tmp_path / "POPE", "aokvqa", "popular") == rucaibox
    assert pope.find_question_file(tmp_path / "VCD", "gqa", "adversarial") == vcd
    assert pope.find_question_file(tmp_path / "VCD" / "experiments" / "data" / "POPE", "gqa", "adversarial") == vcd
    with pytest.raises(EvalInputError, match=r"no POPE gqa 'random' question file .*RUCAIBox/POPE"):
        pope.find_question_file(tmp_path / "VCD", "gqa", "random")


def test_content_pins_are_the_released_files() -> None:
    # spec Part D (full A-OKVQA / GQA hashes; COCO ones checked against the spec's prefixes)
    expected = {
        ("aokvqa", "random"): "e7f3e0c5163045a5d0ba536fee1fea30c16893bfe740cca6abba5dd2230dbbe8",
        ("aokvqa", "popular"): "d28ac37966929e67ad4b86056247f9c4a604f2546a4eb8613207fcc8efb945e0",
        ("aokvqa", "adversarial"): "16ecf67827247c8c6f3e31ca1fb731f4dd9e53cad91f2724bce264854688b7ad",
        ("gqa", "random"): "17684ae1c49ee2d5a3656c58d6fbad0c14d3a7dab6ff459c46bd1c06c8787140",
        ("gqa", "popular"): "1199529081243c96691902bd075b8146ec80d5fcd0332dd424c865b72dd480ef",
        ("gqa", "adversarial"): "954050ea3d77b0883efa33ccfc263fdfd48f9a67749eb0930047fc0dd8c199f6",
    }
    seem = {(f.dataset, f.split): sha for sha, f in pope.CONTENT_PINS.items() if f.dataset != "coco"}
    assert seem == expected
    coco = sorted((f.split, f.versions, sha[:8]) for sha, f in pope.CONTENT_PINS.items() if f.dataset == "coco")
    assert coco == sorted([
        ("random", ("e3e3926",), "ebbebf87"), ("popular", ("e3e3926",), "e665758c"),
        ("adversarial", ("e3e3926",), "3c75c0e1"), ("random", ("edebdda", "head"), "9999e9a2"),
        ("popular", ("edebdda", "head"), "2db93c74"), ("adversarial", ("edebdda",), "8ecffcc5"),
        ("adversarial", ("head",), "909200ae"),
    ])


def test_hf_copy_is_identified_by_content_without_pinned_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_pope import _write_hf_copy

    _write_hf_copy(tmp_path / "POPE")
    # the copy's random rows: (1, dog, yes), (2, cat, no) on COCO_val2014_000000000001.jpg
    rows = [pope.PopeQuestion(1, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
            pope.PopeQuestion(2, "COCO_val2014_000000000001.jpg", "Is there a cat in the image?", "no")]
    pins = {pope.questions_sha256(rows): pope.PinnedPopeFile("random", ("edebdda", "head"))}
    monkeypatch.setattr("vlmfix.eval.pope.hf.CONTENT_PINS", pins)
    split = pope.load_hf_pope(tmp_path / "POPE", "random", cache_dir=tmp_path / "cache")
    assert split.versions == ("edebdda", "head")
