"""The results browser on AMBER, MME and HallusionBench runs: every item listed, the red words exactly the AMBER
scorer's hallucinated nouns (at the characters it recorded), wrong answers red as each scorer scored them,
`unknown` answers shown as such, the filters' data, nothing loaded from the network. The runs are written by
hand with the real scorers, as the app writes them; the expected marks are read off the texts by hand."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.browse import write_items, write_page
from benchmarks.generation import Item
from tests.test_browse import Page, image_file, parsed, result_json
from vlmfix.eval import amber, hallusion, mme

# ------------------------------------------------------------------ AMBER
RELATION = {"dog": ["puppy"], "grass": ["ground"], "frisbee": [], "cat": [], "car": [], "light": [], "bench": []}
GENERATIVE = {1: (["dog", "grass"], ["frisbee", "cat"]), 2: (["bench"], ["car"])}  # id -> (truth, hallu)
DISCRIMINATIVE = {  # id -> (type, truth, query)
    3: ("discriminative-hallucination", "no", "Is there a cat in this image?"),
    4: ("discriminative-attribute-state", "yes", "Is the dog brown in this image?"),
    5: ("discriminative-hallucination", "no", "Is there a car in this image?"),
}
RESPONSES = {
    "greedy": {1: 'Two puppies on the ground, a "frisbee" and a car; a light.', 2: "A bench and a cat.",
               3: "Yes", 4: "Yes", 5: "No"},
    "vcd": {1: "A dog on grass.", 2: "A bench.", 3: "No", 4: "No, it is black.", 5: "No"},
}
# read off by hand: with exact matches only, puppies -> puppy (truth dog), ground (truth grass), light (safe list)
RED = {("greedy", 1): ["frisbee", "car"], ("greedy", 2): ["cat"], ("vcd", 1): [], ("vcd", 2): []}
GREEN = {("greedy", 1): ["puppies", "ground"], ("greedy", 2): ["bench"], ("vcd", 1): ["dog", "grass"],
         ("vcd", 2): ["bench"]}
GREY = {("greedy", 1): ["light"]}
AMBER_WRONG = {("greedy", 3), ("vcd", 4)}  # amber_exact: "No, it is black." is not exactly "No": unknown, wrong


def amber_data(root: Path) -> amber.AmberData:
    annotations = [{"id": k, "type": "generative", "truth": t, "hallu": h} for k, (t, h) in GENERATIVE.items()]
    annotations += [{"id": k, "type": t, "truth": truth} for k, (t, truth, _) in DISCRIMINATIVE.items()]
    (root / "data" / "query").mkdir(parents=True)
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    (root / "data" / "relation.json").write_text(json.dumps(RELATION))
    (root / "data" / "safe_words.txt").write_text("light\n")
    return amber.load_amber(root)


def amber_runs(root: Path, images: Path) -> dict[str, amber.GenerativeScores]:
    data = amber_data(root / "amber")
    reports = {}
    for method, responses in RESPONSES.items():
        run_dir = root / "results" / "toy" / "amber" / f"{method}-0"
        run_dir.mkdir(parents=True)
        items = [Item(k, image_file(images, k), "Describe this image.") for k in GENERATIVE]
        items += [Item(k, image_file(images, 1), query) for k, (_, _, query) in DISCRIMINATIVE.items()]
        write_items(run_dir, items, {k: {"part": "generative" if k in GENERATIVE else "discriminative"}
                                     for k in responses})
        generative = amber.score_generative({k: responses[k] for k in GENERATIVE}, data, amber.SimpleNouns(),
                                            amber.NoSimilarity())
        discriminative = amber.score_discriminative({k: responses[k] for k in DISCRIMINATIVE}, data)
        amber.write_amber_scored(run_dir / "amber_scored.json", data, responses, generative, discriminative)
        result_json(run_dir, "amber", "amber", method, {"CHAIR": generative.chair, "f1": discriminative.f1})
        reports[method] = generative
    return reports


class AnswersPage(Page):
    """`Page`, plus AMBER's grey marks (`safe`) and per cell its answers (MME's two): each `div.ans` verdict
    class and its answer's text."""

    def __init__(self) -> None:
        super().__init__()
        self._answer: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().handle_starttag(tag, attrs)
        classes = (dict(attrs).get("class") or "").split()
        cell = self._cell()
        if cell is not None and tag == "div" and classes[:1] == ["ans"]:
            cell.setdefault("answers", []).append({"class": classes[1], "text": ""})
        if cell is not None and tag == "span" and classes == ["safe"]:
            self._mark = {"class": "safe", "node": dict(attrs).get("data-node"), "text": ""}
        if cell is not None and tag == "span" and classes == ["answer"]:
            self._answer = cell["answers"][-1]

    def handle_endtag(self, tag: str) -> None:
        super().handle_endtag(tag)
        if tag == "span":
            self._answer = None

    def handle_data(self, data: str) -> None:
        super().handle_data(data)
        if self._answer is not None:
            self._answer["text"] += data


def sections(page_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Section id -> its item rows."""
    text = page_path.read_text(encoding="utf-8")
    out = {}
    for match in re.finditer(r'<section class="bench" id="bench-([^"]+)">(.*?)</section>', text, re.S):
        page = AnswersPage()
        page.feed(match.group(2))
        out[match.group(1)] = page.rows
    return out


def test_amber_descriptions_mark_exactly_the_scorers_hallucinated_nouns(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    reports = amber_runs(tmp_path, images)
    tables = sections(write_page(tmp_path / "results"))
    assert set(tables) == {"amber-generative", "amber-discriminative"}
    rows = tables["amber-generative"]
    assert [int(r["data-key"]) for r in rows] == list(GENERATIVE)  # every description, once
    for row in rows:
        key = int(row["data-key"])
        for method, cell in zip(RESPONSES, row["cells"]):
            text = RESPONSES[method][key]
            marks = {kind: [m["text"] for m in cell["marks"] if m["class"] == kind] for kind in ("hal", "ok", "safe")}
            assert marks["hal"] == RED[(method, key)]
            assert marks["ok"] == GREEN[(method, key)]
            assert marks["safe"] == GREY.get((method, key), [])
            outcome = next(o for o in reports[method].outcomes if o.id == key)  # the scorer's own verdicts
            assert [m["node"] for m in cell["marks"] if m["class"] == "hal"] == [
                noun for noun, bad in zip(outcome.nouns, outcome.hallucinated) if bad]
            assert cell["text"].startswith(text)  # the response, unaltered
    by_key = {int(r["data-key"]): r for r in rows}
    assert json.loads(by_key[1]["data-hal"]) == ["car", "frisbee"]
    assert by_key[1]["data-disagree"] == "1" and by_key[1]["data-wrong"] == "1"
    assert by_key[2]["data-disagree"] == "1"  # greedy also names a cat


def test_amber_scored_file_records_each_nouns_characters_without_changing_the_figures(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    reports = amber_runs(tmp_path, images)
    scored = json.loads((tmp_path / "results" / "toy" / "amber" / "greedy-0" / "amber_scored.json").read_text())
    first = scored["generative"]["responses"][0]
    text = RESPONSES["greedy"][1]
    assert [text[m["start"]:m["end"]] for m in first["mentions"]] == ["puppies", "ground", "frisbee", "car", "light"]
    assert [(m["rule"], m["entry"]) for m in first["mentions"]] == [
        ("truth", "dog"), ("truth", "grass"), ("hallu", "frisbee"), ("unmatched", None), ("safe list", None)]

    class CallOnly:  # a normalizer that cannot locate its nouns: the same figures, no spans
        name, comparable_to_official, version, nltk_version = "simple", False, "x", None

        def __call__(self, text: str, vocabulary: frozenset[str]) -> list[str]:
            return amber.SimpleNouns()(text, vocabulary)

    data = amber.load_amber(tmp_path / "amber")
    plain = amber.score_generative({k: RESPONSES["greedy"][k] for k in GENERATIVE}, data, CallOnly(),
                                   amber.NoSimilarity())
    assert plain.to_json() == reports["greedy"].to_json() == scored["generative"]["scores"]
    assert [(o.nouns, o.hallucinated) for o in plain.outcomes] == [
        (o.nouns, o.hallucinated) for o in reports["greedy"].outcomes]
    assert all(span is None for o in plain.outcomes for span in o.spans)


def test_amber_yes_no_answers_marked_as_scored(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    amber_runs(tmp_path, images)
    rows = sections(write_page(tmp_path / "results"))["amber-discriminative"]
    assert [int(r["data-key"]) for r in rows] == list(DISCRIMINATIVE)
    for row in rows:
        key = int(row["data-key"])
        for method, cell in zip(RESPONSES, row["cells"]):
            assert RESPONSES[method][key] in cell["text"]
            assert (cell["class"] == "wrong") == ((method, key) in AMBER_WRONG)
    by_key = {int(r["data-key"]): r for r in rows}
    assert json.loads(by_key[3]["data-hal"]) == ["cat"]  # greedy said yes to an absent cat
    assert "parsed: unknown" in by_key[4]["cells"][1]["text"]
    assert by_key[3]["data-group"] == "amber/existence" and by_key[4]["data-group"] == "amber/state"


def test_nltk_nouns_are_located_through_its_rewritten_quotes():
    """NLTK's tokenizer writes a double quote as `` or ''; the spans still index the text as given (a stand-in
    for NLTK's tokenizer and tagger, which need data that is never downloaded)."""

    class FakeNltk:
        @staticmethod
        def word_tokenize(text: str) -> list[str]:
            tokens = re.findall(r'"|\w+|[^\w\s]', text)
            quotes = iter(["``", "''"] * len(tokens))
            return [next(quotes) if t == '"' else t for t in tokens]

        @staticmethod
        def pos_tag(tokens: list[str]) -> list[tuple[str, str]]:
            return [(t, "NNS" if t == "dogs" else "NN" if t in ("met", "Cat") else "DT") for t in tokens]

    class Lemmatizer:
        def lemmatize(self, word: str) -> str:
            return word[:-1] if word.endswith("s") else word

    nouns = object.__new__(amber.NltkNouns)
    nouns._nltk, nouns._lemmatizer, nouns.lower = FakeNltk(), Lemmatizer(), False
    text = 'The "dogs" met a Cat; the dogs'
    located = nouns.located(text, frozenset({"dog"}))
    assert [(noun, text[a:b]) for noun, (a, b) in located] == [("dog", "dogs"), ("met", "met"), ("Cat", "Cat"),
                                                                ("dog", "dogs")]
    assert [span for _, span in located] == [(5, 9), (11, 14), (17, 20), (26, 30)]


# ------------------------------------------------------------------ MME
MME_ROWS = [  # (subtask, image, question, label)
    ("count", "c.png", "Is there one dog?", "yes"), ("count", "c.png", "Are there two dogs?", "no"),
    ("existence", "a.png", "Is there a dog?", "yes"), ("existence", "a.png", "Is there a cat?", "no"),
    ("existence", "b.png", "Is there a car?", "yes"), ("existence", "b.png", "Is there a bus?", "no"),
]
MME_ANSWERS = {"greedy": ["Yes", "Yes", "Yes", "No", "No", "No"], "vcd": ["Yes", "No", "Yes", "No", "Yes", "Hmm"]}
MME_WRONG = {("greedy", 1), ("greedy", 4), ("vcd", 5)}  # question index, read off by hand


def yes_no_runs(root: Path, names: tuple[str, str, str], questions: list[Any], answers_by_method: dict[str, list[str]],
                score: Callable[..., Any], write_scored: Callable[..., None],
                headline: Callable[[Any], dict[str, float]]) -> None:
    """One run folder per method for a yes/no benchmark (`names`: benchmark, result kind, scored file): items,
    the scorer's own scored file and result.json, as the app writes them."""
    benchmark, kind, scored_file = names
    for method, texts in answers_by_method.items():
        run_dir = root / "results" / "toy" / benchmark / f"{method}-0"
        run_dir.mkdir(parents=True)
        write_items(run_dir, [Item(q.key, q.image_path, q.question) for q in questions])
        answers = dict(enumerate(texts))
        scores = score(questions, answers)
        write_scored(run_dir / scored_file, questions, answers, scores)
        result_json(run_dir, benchmark, kind, method, headline(scores))


def mme_runs(root: Path, images: Path) -> list[mme.MmeQuestion]:
    questions = [mme.MmeQuestion(k, s, i, q, a, image_file(images, ord(i[0]))) for k, (s, i, q, a) in
                 enumerate(MME_ROWS)]
    yes_no_runs(root, ("mme_hallucination", "mme", "mme_scored.json"), questions, MME_ANSWERS, mme.score_mme,
                mme.write_mme_scored, lambda scores: {"total": scores.total})
    return questions


def test_mme_one_row_per_image_pair_with_wrong_answers_marked(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    mme_runs(tmp_path, images)
    text = write_page(tmp_path / "results").read_text(encoding="utf-8")
    rows = sections(tmp_path / "results" / "browse.html")["mme_hallucination"]
    assert [r["data-key"] for r in rows] == ["count/c.png", "existence/a.png", "existence/b.png"]
    for row, first in zip(rows, (0, 2, 4)):
        for method, cell in zip(MME_ANSWERS, row["cells"]):
            both = all((method, k) not in MME_WRONG for k in (first, first + 1))
            assert cell["class"] == ("right" if both else "wrong")
            assert [(a["class"], a["text"]) for a in cell["answers"]] == [
                ("wrong" if (method, k) in MME_WRONG else "right", MME_ANSWERS[method][k]) for k in (first, first + 1)]
    assert [r["data-group"] for r in rows] == ["mme_hallucination/count", *["mme_hallucination/existence"] * 2]
    assert [r["data-disagree"] for r in rows] == ["1", "0", "1"]
    options = set(re.findall(r'<option value="(mme_hallucination/[^"]+)"', text))
    assert options == {"mme_hallucination/count", "mme_hallucination/existence"}  # the subtask filter


# ------------------------------------------------------------------ HallusionBench
HALLUSION_ROWS = [  # (category, subcategory, set, figure, question id, question, gt, has image)
    ("VD", "illusion", "0", "0", "0", "Is the left line longer?", "1", True),
    ("VD", "illusion", "0", "1", "0", "Is the left line longer?", "0", True),
    ("VS", "chart", "0", "0", "0", "Was the GDP higher in 2010?", "1", False),
    ("VS", "chart", "0", "1", "0", "Was the GDP higher in 2010?", "0", True),
]
HALLUSION_ANSWERS = {"greedy": ["Yes.", "I cannot tell.", "I cannot tell.", "No."],
                     "vcd": ["No.", "No.", "Yes.", "Yes."]}
HALLUSION_WRONG = {("greedy", 1), ("vcd", 0), ("vcd", 3)}  # greedy's unknown on VS without an image: correct


def hallusion_runs(root: Path, images: Path) -> list[hallusion.HallusionQuestion]:
    questions = [hallusion.HallusionQuestion(k, c, s, "1", set_id, fig, qid, q, gt,
                                             image_file(images, 20 + k) if has else None)
                 for k, (c, s, set_id, fig, qid, q, gt, has) in enumerate(HALLUSION_ROWS)]
    yes_no_runs(root, ("hallusionbench", "hallusion", "hallusion_scored.json"), questions, HALLUSION_ANSWERS,
                hallusion.score_hallusion, hallusion.write_hallusion_scored, lambda scores: {"qAcc": scores.qacc})
    return questions


def test_hallusion_questions_marked_as_scored_with_unknown_shown(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    hallusion_runs(tmp_path, images)
    rows = sections(write_page(tmp_path / "results"))["hallusionbench"]
    assert [int(r["data-key"]) for r in rows] == list(range(len(HALLUSION_ROWS)))
    for row in rows:
        key = int(row["data-key"])
        for method, cell in zip(HALLUSION_ANSWERS, row["cells"]):
            assert HALLUSION_ANSWERS[method][key] in cell["text"]
            assert (cell["class"] == "wrong") == ((method, key) in HALLUSION_WRONG)
            unknown = HALLUSION_ANSWERS[method][key] == "I cannot tell."
            assert ("parsed: unknown" in cell["text"]) == unknown
    assert "counted correct" in rows[2]["cells"][0]["text"] and "counted wrong" in rows[1]["cells"][0]["text"]
    text = (tmp_path / "results" / "browse.html").read_text(encoding="utf-8")
    assert "text only" in re.search(r'data-key="2".*?</th>', text, re.S).group(0)  # the question without an image
    assert [r["data-group"] for r in rows] == ["hallusionbench/VD/illusion"] * 2 + ["hallusionbench/VS/chart"] * 2
    assert [r["data-wrong"] for r in rows] == ["1", "1", "0", "1"]


@pytest.mark.parametrize("make", [amber_runs, mme_runs, hallusion_runs])
def test_release_pages_load_nothing_from_the_network(tmp_path, make):
    images = tmp_path / "images"
    images.mkdir()
    make(tmp_path, images)
    text = write_page(tmp_path / "results").read_text(encoding="utf-8")
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE)
    page = parsed(tmp_path / "results" / "browse.html")
    linked = [value for _, name, value in page.attributes if name in ("src", "href", "srcset", "data")]
    assert all(str(value).startswith("data:image/") for value in linked)
    assert not any(tag in ("link", "iframe", "object") for tag, _, _ in page.attributes)
    # each run's column is named for the `#runs=` preset, in the order of its cells
    assert [v for tag, name, v in page.attributes if tag == "th" and name == "data-run"][:2] == ["greedy", "vcd"]
