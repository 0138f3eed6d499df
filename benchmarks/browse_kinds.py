"""The results browser's benchmark kinds: how each reads a run's per-item output and draws an item's row.

Each kind reads what its scorer recorded (never re-scores): CHAIR `chair_scored.json` (each mention's
characters), POPE `predictions.jsonl` parsed by the run's parser, AMBER `amber_scored.json` (each noun's
characters, the rule that decided it; the yes/no answers as scored), MME `mme_scored.json` and HallusionBench
`hallusion_scored.json` (each answer as parsed and whether it was scored correct). A kind may have several parts
(AMBER: generative, discriminative), each its own table. Per item a kind gives the cell of each run and what the
filters compare: a signature (runs disagree when theirs differ), the hallucinated objects, whether the run got
it wrong, and the item's group (MME subtask, HallusionBench category/subcategory, AMBER question type).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.summary import fmt
from vlmfix.eval.yesno import parse_answer


@dataclass
class Run:
    """One run of a benchmark: its result.json, its label in the summary table and its per-item outputs."""

    result: dict[str, Any]
    label: str
    items: dict[Any, dict[str, Any]] = field(default_factory=dict)  # key -> items.jsonl row
    parts: dict[str, dict[Any, Any]] = field(default_factory=dict)  # part -> row key -> what the page shows


@dataclass(frozen=True)
class Cell:
    """One run's cell of an item: its HTML and what the filters compare."""

    html: str
    signature: Hashable = None
    hallucinated: frozenset[str] = frozenset()
    wrong: bool = False


@dataclass(frozen=True)
class About:
    """The item's first column: its image (items.jsonl path), its key, what is asked or known, its group."""

    image: str | None
    html: str
    group: str | None = None


MISSING = Cell('<td class="missing">no output</td>')
EXISTENCE_QUESTION = re.compile(r"^\s*is there (?:a|an) (.+?) in (?:this|the) image\?", re.IGNORECASE)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------ pieces shared by the kinds
@dataclass(frozen=True)
class Mark:
    """A marked word: its characters in the text, its class (`hal`, `ok` or `safe`), object and tooltip."""

    start: int
    end: int
    kind: str
    node: str
    tip: str


def marked_text(text: str, marks: Sequence[Mark]) -> str:
    """The text as HTML, each mark a span at its recorded characters (overlaps keep the first)."""
    parts, position = [], 0
    for mark in sorted(marks, key=lambda m: m.start):
        if mark.start < position:  # the scorers' tokens never overlap
            continue
        parts += [esc(text[position:mark.start]),
                  f'<span class="{mark.kind}" data-node="{esc(mark.node)}" title="{esc(mark.tip)}">'
                  f"{esc(text[mark.start:mark.end])}</span>"]
        position = mark.end
    parts.append(esc(text[position:]))
    return "".join(parts)


def answer_cell(text: str | None, parsed: str | None, correct: bool | None, note: str = "") -> Cell:
    """A yes/no answer: red when scored wrong, the parsed answer under it (`unknown` marked as such)."""
    if text is None:
        return Cell('<td class="missing">no answer</td>', None, frozenset(), True)
    verdict = "wrong" if correct is False else "right"
    unknown = ' <span class="unk">unknown</span>' if parsed == "unknown" else ""
    return Cell(f'<td class="{verdict}"><div class="answer">{esc(text)}</div><div class="metrics">parsed: '
                f'{esc(parsed)}{unknown}{esc(note)}</div></td>', parsed, frozenset(), correct is False)


def question_about(info: Mapping[str, Any], label: Any, extra: str = "", group: str | None = None) -> About:
    return About(info.get("image"), f'<div class="question">{esc(info.get("prompt", ""))}</div>'
                                    f'<div class="gt">label: {esc(label)}{extra}</div>', group)


# ------------------------------------------------------------------ the kinds
class Kind:
    """A benchmark kind: `load` fills `run.parts`; `about` and `cell` draw an item's row."""

    parts: tuple[str, ...] = ("",)
    what = "answer"

    def load(self, run: Run, run_dir: Path) -> None:
        raise NotImplementedError

    def keys(self, run: Run, part: str) -> list[Any]:
        """The run's items of `part`, in order (items.jsonl, then any output it lacks)."""
        own = run.parts.get(part, {})
        return list(dict.fromkeys([*(k for k, row in run.items.items() if row.get("part", part) == part), *own]))

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        raise NotImplementedError

    def cell(self, part: str, output: Any) -> Cell:
        raise NotImplementedError

    def headline(self, part: str) -> tuple[str, ...]:
        return ()


def item_info(runs: Sequence[Run], key: Any) -> dict[str, Any]:
    return next((run.items[key] for run in runs if key in run.items), {})


def first_output(runs: Sequence[Run], part: str, key: Any) -> Any:
    return next((run.parts[part][key] for run in runs if key in run.parts.get(part, {})), None)


class Chair(Kind):
    """CHAIR: the caption with every mention the scorer counted, at the characters it recorded."""

    what = "caption"

    def load(self, run: Run, run_dir: Path) -> None:
        run.parts[""] = {s["image_id"]: s for s in read_json(run_dir / "chair_scored.json").get("sentences", [])}

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        output = first_output(runs, part, key) or {}
        gt = ", ".join(output.get("mscoco_gt_words", []))
        return About(item_info(runs, key).get("image"), f'<div class="gt">ground truth: {esc(gt) or "none"}</div>')

    def cell(self, part: str, output: Any) -> Cell:
        if output is None:
            return Cell('<td class="missing">no caption</td>')
        metrics = output.get("metrics", {})
        hallucinated = frozenset(node for _, node in output.get("mscoco_hallucinated_words", []))
        marks = []
        for m in output.get("mentions", []):
            if m.get("start") is None:
                continue
            tip = f"matched '{m['surface']}' -> {m['node']}" + (
                " (not in the ground truth)" if m["hallucinated"] else " (in the ground truth)")
            marks.append(Mark(m["start"], m["end"], "hal" if m["hallucinated"] else "ok", m["node"], tip))
        numbers = " · ".join(f"{name} {fmt(metrics.get(name))}" for name in ("CHAIRi", "Recall") if name in metrics)
        listed = ", ".join(sorted(hallucinated)) or "none"
        return Cell(f'<td><div class="caption">{marked_text(output["caption"], marks)}</div>'
                    f'<div class="metrics">{esc(numbers)} · hallucinated: {esc(listed)}</div></td>',
                    frozenset(output.get("mscoco_generated_words", [])), hallucinated, bool(hallucinated))

    def headline(self, part: str) -> tuple[str, ...]:
        return ("CHAIRs", "CHAIRi", "Recall")


class Pope(Kind):
    """POPE: each run's answer as parsed by its parser; a "yes" about an absent object hallucinates it."""

    def load(self, run: Run, run_dir: Path) -> None:
        parser = ((run.result.get("fingerprint") or {}).get("pope") or {}).get("parser", "official")
        outputs = {}
        for row in read_jsonl(run_dir / "predictions.jsonl"):
            info = run.items.get(row["question_id"], {})
            outputs[row["question_id"]] = {"text": row["text"], "label": info.get("label"),
                                           "object": info.get("object"),
                                           "parsed": parse_answer(row["text"], parser, info.get("label"))}
        run.parts[""] = outputs

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        info = item_info(runs, key)
        target = info.get("object")
        return question_about(info, info.get("label"), f" · object: {esc(target)}" if target else "")

    def cell(self, part: str, output: Any) -> Cell:
        if output is None:
            return Cell('<td class="missing">no answer</td>')
        label = output["label"]
        cell = answer_cell(output["text"], output["parsed"], None if label is None else output["parsed"] == label)
        hallucinated = label == "no" and output["parsed"] == "yes" and output["object"]
        return Cell(cell.html, cell.signature, frozenset([output["object"]]) if hallucinated else frozenset(),
                    cell.wrong)

    def headline(self, part: str) -> tuple[str, ...]:
        return ("f1", "accuracy", "yes_ratio")


class Amber(Kind):
    """AMBER: descriptions with each noun the scorer counted (hallucinated red, matched to the truth green, on
    AMBER's safe list grey); yes/no questions with the answers scored wrong red."""

    parts = ("generative", "discriminative")

    def load(self, run: Run, run_dir: Path) -> None:
        scored = read_json(run_dir / "amber_scored.json")
        for part in self.parts:
            rows = (scored.get(part) or {}).get("responses", [])
            run.parts[part] = {row["id"]: {**row, "query": run.items.get(row["id"], {}).get("prompt", "")}
                               for row in rows}

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        info = item_info(runs, key)
        output = first_output(runs, part, key) or {}
        if part == "generative":
            return About(info.get("image"), f'<div class="gt">truth: {esc(", ".join(output.get("truth", [])))}'
                                            f'</div><div class="gt">hallu: {esc(", ".join(output.get("hallu", [])))}'
                                            "</div>")
        group = output.get("group")
        return question_about(info, output.get("truth"), f" · {esc(group)}" if group else "", group)

    def cell(self, part: str, output: Any) -> Cell:
        if output is None:
            return MISSING
        if part == "discriminative":
            cell = answer_cell(output["response"], output["parsed"], output["correct"])
            found = EXISTENCE_QUESTION.match(output.get("query", "")) if output.get("group") == "existence" else None
            hallucinated = frozenset([found.group(1)]) if found and output["truth"] == "no" and \
                output["parsed"] == "yes" else frozenset()
            return Cell(cell.html, cell.signature, hallucinated, cell.wrong)
        marks = []
        for m in output["mentions"]:
            if m["start"] is None:
                continue
            kind = "hal" if m["hallucinated"] else "safe" if m["rule"] == "safe list" else "ok"
            entry = f" '{m['entry']}'" if m.get("entry") else ""
            verdict = "hallucinated" if m["hallucinated"] else "not hallucinated"
            marks.append(Mark(m["start"], m["end"], kind, m["noun"], f"noun '{m['noun']}': {m['rule']}{entry} "
                                                                       f"({verdict})"))
        hallucinated = frozenset(m["noun"] for m in output["mentions"] if m["hallucinated"])
        nouns = len(output["mentions"])
        numbers = f"{sum(m['hallucinated'] for m in output['mentions'])} of {nouns} nouns hallucinated"
        listed = ", ".join(sorted(hallucinated)) or "none"
        return Cell(f'<td><div class="caption">{marked_text(output["response"], marks)}</div>'
                    f'<div class="metrics">{esc(numbers)}: {esc(listed)} · covered: '
                    f'{esc(", ".join(output.get("covered", [])) or "none")}</div></td>',
                    frozenset(m["noun"] for m in output["mentions"]), hallucinated, bool(hallucinated))

    def headline(self, part: str) -> tuple[str, ...]:
        return ("CHAIR", "Cover", "Hal", "Cog") if part == "generative" else ("accuracy", "f1", "unknown_rate")


class Mme(Kind):
    """MME: one row per image pair (its Yes and its No question); each answer red when scored wrong."""

    what = "answer pair"

    def load(self, run: Run, run_dir: Path) -> None:
        pairs: dict[str, list[dict[str, Any]]] = {}
        for row in read_json(run_dir / "mme_scored.json").get("questions", []):
            pairs.setdefault(f"{row['subtask']}/{row['image']}", []).append(row)
        run.parts[""] = pairs

    def keys(self, run: Run, part: str) -> list[Any]:
        return list(run.parts.get(part, {}))

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        pair = first_output(runs, part, key) or []
        image = next((item_info(runs, q["key"]).get("image") for q in pair if item_info(runs, q["key"])), None)
        asked = "".join(f'<div class="question">{esc(q["question"])} <span class="gt">({esc(q["answer"])})</span>'
                        "</div>" for q in pair)
        return About(image, asked, pair[0]["subtask"] if pair else None)

    def cell(self, part: str, output: Any) -> Cell:
        if not output:
            return MISSING
        answers = []
        for q in output:
            verdict = "wrong" if q["correct"] is not True else "right"
            text = esc(q["text"]) if q["text"] is not None else "<em>no answer</em>"
            answers.append(f'<div class="ans {verdict}"><span class="answer">{text}</span> '
                           f'<span class="metrics">parsed: {esc(q["parsed"])}</span></div>')
        both = all(q["correct"] is True for q in output)
        return Cell(f'<td class="{"right" if both else "wrong"}">{"".join(answers)}<div class="metrics">'
                    f'{"both right (acc+)" if both else "not both right"}</div></td>',
                    tuple(q["parsed"] for q in output), frozenset(), not both)

    def headline(self, part: str) -> tuple[str, ...]:
        return ("total", "existence score", "count score", "position score", "color score")


class Hallusion(Kind):
    """HallusionBench: one row per question; red when scored wrong, `unknown` (the judge's "unclear") shown."""

    def load(self, run: Run, run_dir: Path) -> None:
        run.parts[""] = {row["key"]: row for row in read_json(run_dir / "hallusion_scored.json").get("questions", [])}

    def about(self, part: str, key: Any, runs: Sequence[Run]) -> About:
        info = item_info(runs, key)
        q = first_output(runs, part, key) or {}
        group = f"{q['category']}/{q['subcategory']}" if q else None
        where = f" · {group} · set {q.get('set_id')} figure {q.get('figure_id')}" if q else ""
        where += " · text only" if q.get("text_only") else ""
        return question_about(info, q.get("answer"), esc(where), group)

    def cell(self, part: str, output: Any) -> Cell:
        if output is None or output.get("text") is None:
            return Cell('<td class="missing">no answer</td>', None, frozenset(), True)
        note = ""
        if output["parsed"] == "unknown":
            note = " (counted correct: a VS question without an image)" if output["correct"] else " (counted wrong)"
        return answer_cell(output["text"], output["parsed"], output["correct"], note)

    def headline(self, part: str) -> tuple[str, ...]:
        return ("aAcc", "fAcc", "qAcc", "unknown_rate")


KINDS: dict[str, Kind] = {"chair": Chair(), "pope": Pope(), "amber": Amber(), "mme": Mme(),
                          "hallusion": Hallusion()}
