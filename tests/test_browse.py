"""The results browser (`benchmarks.browse`): one static page that lists every item, marks exactly the mentions the
CHAIR scorer counted (at the characters it recorded), marks wrong POPE answers, loads nothing from the network
and pages large sweeps. The runs are written by hand with the real scorers, as the app writes them."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image

from benchmarks.browse import BrowseCallback, main, write_items, write_page
from benchmarks.generation import Item
from vlmfix.eval import chair, pope
from vlmfix.eval.yesno import parse_answer
from vlmfix.testing import random_image

# image id -> caption per method; the ground truth below makes some mentions hallucinated
CAPTIONS = {
    "greedy": {
        1: "A Puppy and two hot dogs near the toilet seat, and a dog.",
        2: "İnside: a man rides a bike past a cat; people watch.",
        3: "A plain wall.",
    },
    "vcd": {
        1: "A dog and a hot dog.",
        2: "A man rides a bike past a cat; people watch.",
        3: "A cat sits under an umbrella; the cat sleeps.",
    },
}
GROUND_TRUTH = {1: ["dog"], 2: ["person", "bicycle"], 3: []}


def image_file(folder: Path, seed: int, size: int = 96) -> Path:
    path = folder / f"image_{seed}.png"
    if not path.exists():
        random_image(size, seed).save(path)
    return path


def result_json(run_dir: Path, benchmark: str, kind: str, method: str, metrics: dict[str, Any]) -> None:
    result = {"model": "toy", "benchmark": benchmark, "kind": kind, "method": method, "metrics": metrics,
              "complete": True, "result_dir": str(run_dir),
              "fingerprint": {"method": {"name": method, "params": {}}, "pope": {"parser": "official"}}}
    (run_dir / "result.json").write_text(json.dumps(result))


def chair_runs(root: Path, images: Path) -> dict[str, chair.ChairReport]:
    """One CHAIR run per method under root/results, scored by the real scorer; returns the reports."""
    extractor = chair.make_extractor()
    reports = {}
    for method, captions in CAPTIONS.items():
        run_dir = root / "results" / "toy" / "chair" / f"{method}-0"
        run_dir.mkdir(parents=True)
        items = [Item(key, image_file(images, key), "Describe the image.") for key in captions]
        write_items(run_dir, items)
        report = chair.score_chair([chair.Caption(k, c) for k, c in captions.items()], GROUND_TRUTH, extractor)
        chair.write_chair_scored(run_dir / "chair_scored.json", report)
        result_json(run_dir, "chair", "chair", method, {"CHAIRi": report.overall.CHAIRi,
                                                        "Recall": report.overall.Recall})
        reports[method] = report
    return reports


# question id -> (image, object, label); answers per method
QUESTIONS = {11: (1, "dog", "yes"), 12: (1, "cat", "no"), 13: (2, "bicycle", "yes"), 14: (2, "umbrella", "no")}
ANSWERS = {
    "greedy": {11: "Yes, there is a dog.", 12: "Yes.", 13: "No, I do not see one.", 14: "No."},
    "vcd": {11: "Yes", 12: "No, there is no cat.", 13: "yes", 14: "Hmm, hard to say."},
}
WRONG = {("greedy", 12), ("greedy", 13), ("vcd", 14)}  # by reading the answers against the labels


def pope_runs(root: Path, images: Path) -> None:
    questions = [pope.PopeQuestion(q, f"image_{i}.png", f"Is there a {o} in the image?", label, i, o)
                 for q, (i, o, label) in QUESTIONS.items()]
    for method, answers in ANSWERS.items():
        run_dir = root / "results" / "toy" / "pope_random" / f"{method}-0"
        run_dir.mkdir(parents=True)
        items = [Item(q.question_id, image_file(images, q.image_id), q.text) for q in questions]
        write_items(run_dir, items, {q.question_id: {"label": q.label, "object": q.object} for q in questions})
        (run_dir / "predictions.jsonl").write_text(
            "".join(json.dumps({"question_id": k, "text": t}) + "\n" for k, t in answers.items()))
        scores = pope.score_pope(questions, answers)
        result_json(run_dir, "pope_random", "pope", method, {"f1": scores.f1, "accuracy": scores.accuracy})


class Page(HTMLParser):
    """The page's item rows: per row its attributes and, per run cell, its class, text and marked words."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.attributes: list[tuple[str, str, str | None]] = []  # (tag, name, value) of every attribute
        self.scripts: list[str] = []
        self._stack: list[str] = []
        self._mark: dict[str, Any] | None = None
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.attributes += [(tag, name, value) for name, value in attrs]
        if tag == "script":
            self._in_script = True
        if tag == "tr" and a.get("class") == "item":
            self.rows.append({**a, "cells": []})
        elif tag == "td" and self.rows and "tbody" in self._stack:
            self.rows[-1]["cells"].append({"class": a.get("class"), "text": "", "marks": []})
        elif tag == "span" and a.get("class") in ("hal", "ok") and self._cell() is not None:
            self._mark = {"class": a["class"], "node": a.get("data-node"), "title": a.get("title"), "text": ""}
        if tag not in ("img", "input", "meta", "br", "option"):
            self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        if tag == "span" and self._mark is not None:
            self._cell()["marks"].append(self._mark)
            self._mark = None
        if tag in self._stack:
            while self._stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)
        cell = self._cell()
        if cell is not None:
            cell["text"] += data
        if self._mark is not None:
            self._mark["text"] += data

    def _cell(self) -> dict[str, Any] | None:
        return self.rows[-1]["cells"][-1] if self.rows and self.rows[-1]["cells"] and "td" in self._stack else None


def parsed(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_page_marks_exactly_the_mentions_the_chair_scorer_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    reports = chair_runs(tmp_path, images)
    page = parsed(write_page(tmp_path / "results"))
    chair_rows = page.rows
    assert [int(r["data-key"]) for r in chair_rows] == [1, 2, 3]  # every image, once
    extractor = chair.make_extractor()
    for row in chair_rows:
        for method, cell in zip(CAPTIONS, row["cells"]):
            scored = next(s for s in reports[method].sentences if s.image_id == int(row["data-key"]))
            bad = [m for m in cell["marks"] if m["class"] == "hal"]
            good = [m for m in cell["marks"] if m["class"] == "ok"]
            # the scorer's own count: its hallucinated (surface, node) pairs, in caption order
            assert [(extractor(m["text"]).surface, m["node"]) for m in bad] == [
                ((surface,), node) for surface, node in scored.hallucinated]
            assert len(good) == len(scored.mentions.nodes) - len(scored.hallucinated)
            assert all(m["node"] in GROUND_TRUTH[scored.image_id] for m in good)
            # each marked text, alone, is exactly one mention: the span covers the word(s), no more
            assert all(len(extractor(m["text"]).nodes) == 1 and m["text"] == m["text"].strip() for m in bad + good)
            assert all(extractor(m["text"]).surface[0] in m["title"] for m in bad + good)  # the matched entry
            assert cell["text"].startswith(CAPTIONS[method][scored.image_id])  # the caption, unaltered
    by_key = {int(r["data-key"]): r for r in chair_rows}
    assert by_key[1]["data-disagree"] == "1"  # greedy also names a toilet
    assert by_key[2]["data-disagree"] == "0"  # both name a man, a bike, a cat and people
    assert json.loads(by_key[3]["data-hal"]) == ["cat", "umbrella"]
    words = {(v or "") for tag, name, v in page.attributes if tag == "option" and name == "value"}
    assert {"hot dog", "toilet", "cat", "umbrella"} <= words  # the object filter offers each hallucinated object


def test_mention_spans_index_the_original_caption():
    extractor = chair.make_extractor()
    caption = "İ saw a Puppy, two HOT DOGS and the toilet seat."
    mentions = extractor(caption)
    assert [caption[a:b] for a, b in mentions.spans] == ["Puppy", "HOT DOGS", "toilet seat"]
    assert mentions.nodes == ("dog", "hot dog", "toilet")


def test_page_lists_every_question_and_marks_wrong_answers(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pope_runs(tmp_path, images)
    page = parsed(write_page(tmp_path / "results"))
    assert [int(r["data-key"]) for r in page.rows] == list(QUESTIONS)
    for row in page.rows:
        key = int(row["data-key"])
        for method, cell in zip(ANSWERS, row["cells"]):
            assert ANSWERS[method][key] in cell["text"]
            assert (cell["class"] == "wrong") == ((method, key) in WRONG)
            assert f"parsed: {parse_answer(ANSWERS[method][key], 'official', QUESTIONS[key][2])}" in cell["text"]
    by_key = {int(r["data-key"]): r for r in page.rows}
    assert json.loads(by_key[12]["data-hal"]) == ["cat"]  # greedy said yes to an absent cat
    assert [by_key[k]["data-disagree"] for k in QUESTIONS] == ["0", "1", "1", "1"]


def test_page_loads_nothing_from_the_network(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    chair_runs(tmp_path, images)
    pope_runs(tmp_path, images)
    (tmp_path / "results" / "summary.png").write_bytes((images / "image_1.png").read_bytes())
    path = write_page(tmp_path / "results")
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE)
    page = parsed(path)
    linked = [(tag, name, value) for tag, name, value in page.attributes if name in ("src", "href", "srcset", "data")]
    assert linked and all(str(value).startswith("data:image/") for _, _, value in linked)  # the summary plot
    assert not any(tag in ("link", "iframe", "object") for tag, _, _ in page.attributes)
    thumbnails = json.loads(next(s for s in page.scripts if s.startswith("[")))
    assert len(thumbnails) == 3  # one per image file, shared by the CHAIR and POPE rows
    assert all(uri.startswith("data:image/jpeg;base64,") and len(uri) < 20_000 for uri in thumbnails)


def test_large_sweeps_are_paged_and_draw_only_the_shown_thumbnails(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    captions = {key: f"A dog number {key}." for key in range(120)}
    write_items(run_dir, [Item(key, image_file(images, key % 7, size=400), "Describe.") for key in captions])
    report = chair.score_chair([chair.Caption(k, c) for k, c in captions.items()], {k: ["dog"] for k in captions},
                               chair.make_extractor())
    chair.write_chair_scored(run_dir / "chair_scored.json", report)
    (run_dir / "predictions.jsonl").write_text("")
    result_json(run_dir, "chair", "chair", "greedy", {"CHAIRi": 0.0, "Recall": 1.0})
    main([str(tmp_path / "sweep"), "--page-size", "40", "--thumbnail", "64"])
    page = parsed(tmp_path / "sweep" / "browse.html")
    assert [int(r["data-key"]) for r in page.rows] == list(captions)
    assert "const SIZE = 40;" in next(s for s in page.scripts if "function draw" in s)  # --page-size, not 50
    sources = [name for tag, name, _ in page.attributes if tag == "img" and name in ("src", "alt")]
    assert sources.count("src") == 1 and sources.count("alt") == 121  # only the summary plot is drawn up front
    row_images = [value for tag, name, value in page.attributes if tag == "img" and name == "data-img"]
    assert len(row_images) == 120 and all(value.isdigit() for value in row_images)  # drawn by the pager's script
    thumbnails = json.loads(next(s for s in page.scripts if s.startswith("[")))
    assert len(thumbnails) == 7  # each image file once, however many rows show it
    sizes = {Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size for uri in thumbnails}
    assert sizes == {(64, 64)}


def test_callback_writes_the_page_of_a_sweep_and_of_a_run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pope_runs(tmp_path, images)
    BrowseCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "results")}}}))
    assert len(parsed(tmp_path / "results" / "browse.html").rows) == len(QUESTIONS)
    run_dir = tmp_path / "results" / "toy" / "pope_random" / "vcd-0"  # a single run: its own dir
    BrowseCallback().on_run_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}}))
    page = parsed(run_dir / "browse.html")
    assert len(page.rows) == len(QUESTIONS) and all(len(row["cells"]) == 1 for row in page.rows)
    empty = tmp_path / "no_results"
    empty.mkdir()
    BrowseCallback().on_run_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(empty)}}}))
    assert not (empty / "browse.html").exists()  # a run that failed before its result: no page
