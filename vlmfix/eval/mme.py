"""MME, hallucination subset (Fu et al., arXiv 2306.13394; spec Part B): existence, count, position and color
yes/no questions, two per image (a Yes question and a No question), scored as MME's `eval_tool` does.

Per subtask: acc = correct / questions; acc+ = images whose two answers are both correct / images; score =
100 acc + 100 acc+ (max 200); the subset total is the sum over subtasks (max 800). Answers are parsed by a
named parser of `vlmfix.eval.yesno`: `mme_official` (default, `calculation.py`), `mme_lmms` (lmms-eval) or
`vlmevalkit_yorn`; an unparseable answer ("other") is always wrong. Questions are paired by (subtask, image),
never by line position; an image without exactly two questions is an error.

```python
from vlmfix.eval import mme
questions = mme.load_mme_folder("/data/MME", subtasks=mme.HALLUCINATION_SUBTASKS)
scores = mme.score_mme(questions, {q.key: answer, ...}, parser="mme_official")
scores.total, scores.subtasks["existence"].acc_plus
mme.write_mme_scored("mme_scored.json", questions, answers, scores)   # per question: parsed, correct
```

Release layout: one folder per subtask (one `MME_Benchmark/` level is descended); existence, count, position
and color are flat (`<stem>.jpg` beside `<stem>.txt`), the other subtasks use `images/` and
`questions_answers_YN/`; each txt holds two lines `question<TAB>Yes|No`. A local copy of the HF dataset
`lmms-lab/MME` (parquet: question_id, image, question, answer, category) loads with `load_mme_hf`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.eval._io import PathLike, atomic_write_text, read_text, sha256_json
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.yesno import NO, YES, answer_rates, get_parser

HALLUCINATION_SUBTASKS = ("existence", "count", "position", "color")
PARSERS = ("mme_official", "mme_lmms", "vlmevalkit_yorn")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
OFFICIAL_SUFFIX = " Please answer yes or no."
SOURCE = ("the MME release from its authors (BradyFU/Awesome-Multimodal-Large-Language-Models, MME section), or "
          "a local snapshot of the HF dataset lmms-lab/MME (data.source=hf)")


@dataclass(frozen=True)
class MmeQuestion:
    """One question: `key` is its position in the loaded order (subtask, image, file order), `image` the file
    name inside the subtask, `answer` "yes" / "no"."""

    key: int
    subtask: str
    image: str
    question: str
    answer: str
    image_path: Path | None = None


def prompt_text(question: str, prompt: str = "official", suffix: str = "") -> str:
    """The question as asked: `official` verbatim; `lmms` replaces " Please answer yes or no." by `suffix`."""
    if prompt == "official":
        return question
    if prompt == "lmms":
        return question.replace(OFFICIAL_SUFFIX, suffix)
    raise EvalInputError(f"`mme.prompt` must be official or lmms, got {prompt!r}.")


def _answer(value: str, where: str) -> str:
    label = value.strip().lower()
    if label not in (YES, NO):
        raise EvalInputError(f"{where}: the answer must be Yes or No, got {value!r}.")
    return label


def mme_root(root: PathLike) -> Path:
    """`root`, or its `MME_Benchmark/` (or `MME_Benchmark_release_version/`) child when it holds one."""
    root = Path(root).expanduser()
    for child in ("MME_Benchmark", "MME_Benchmark_release_version"):
        if (root / child).is_dir():
            return root / child
    return root


def load_mme_folder(root: PathLike, subtasks: Sequence[str] = HALLUCINATION_SUBTASKS) -> list[MmeQuestion]:
    """The questions of `subtasks` from a release folder (flat or images/ + questions_answers_YN/ layout)."""
    base = mme_root(root)
    rows: list[tuple[str, str, str, str, Path]] = []
    for subtask in subtasks:
        folder = base / subtask
        if not folder.is_dir():
            raise EvalInputError(f"MME subtask folder {str(folder)!r} does not exist; expected {base}/{{"
                                 f"{','.join(subtasks)}}}/ from {SOURCE}.")
        split = (folder / "questions_answers_YN").is_dir()
        text_dir = folder / "questions_answers_YN" if split else folder
        image_dir = folder / "images" if split else folder
        texts = sorted(text_dir.glob("*.txt"))
        if not texts:
            raise EvalInputError(f"MME subtask folder {str(folder)!r} holds no question files (<image stem>.txt).")
        for text_path in texts:
            image = next((image_dir / (text_path.stem + s) for s in IMAGE_SUFFIXES
                          if (image_dir / (text_path.stem + s)).is_file()), None)
            if image is None:
                raise EvalInputError(f"MME question file {str(text_path)!r} has no image {text_path.stem}.jpg/.png "
                                     f"in {str(image_dir)!r}.")
            lines = [line for line in read_text(text_path, "MME question").splitlines() if line.strip()]
            if len(lines) != 2:
                raise EvalInputError(f"MME question file {str(text_path)!r} has {len(lines)} lines; each image has "
                                     "exactly two (question<TAB>Yes, question<TAB>No).")
            for number, line in enumerate(lines, start=1):
                parts = line.rstrip("\r").split("\t")
                if len(parts) != 2:
                    raise EvalInputError(f"MME question file {str(text_path)!r}, line {number}: expected "
                                         "question<TAB>answer.")
                answer = _answer(parts[1], f"{text_path}, line {number}")
                rows.append((subtask, image.name, parts[0], answer, image))
    return _numbered(rows)


def load_mme_hf(source: PathLike | Sequence[PathLike], subtasks: Sequence[str] = HALLUCINATION_SUBTASKS,
                image_dir: PathLike | None = None) -> list[MmeQuestion]:
    """The questions of `subtasks` from local lmms-lab/MME parquet files (a file, a list, or a folder).

    The image of a row is named by its `question_id` (shared by an image's two questions). With `image_dir`,
    each image is written there once as `<subtask>/<name>` (so the generation reads files); without it the
    questions carry no image path (scoring only).
    """
    import pyarrow.parquet as pq

    paths = [Path(p) for p in source] if isinstance(source, (list, tuple)) else [Path(source)]  # type: ignore[arg-type]
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise EvalInputError(f"MME copy {str(path)!r} does not exist; vlmfix reads local copies only, from "
                                 f"{SOURCE}.")
        files += sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise EvalInputError(f"MME copy {source!r} holds no parquet files.")
    rows: list[tuple[str, str, str, str, Path | None]] = []
    for file in files:
        table = pq.read_table(file)
        missing = {"question_id", "question", "answer", "category", "image"} - set(table.column_names)
        if missing:
            raise EvalInputError(f"MME parquet {str(file)!r} lacks the column(s) {sorted(missing)}; expected the "
                                 "lmms-lab/MME schema.")
        for row in table.to_pylist():
            if row["category"] not in subtasks:
                continue
            name = Path(str(row["question_id"])).name
            answer = _answer(str(row["answer"]), f"{file}, question_id {row['question_id']}")
            image_path = None
            if image_dir is not None:
                image_path = Path(image_dir) / row["category"] / name
                if not image_path.is_file():
                    image_path.parent.mkdir(parents=True, exist_ok=True)
                    image_path.write_bytes(_image_bytes(row["image"], file))
            rows.append((row["category"], name, str(row["question"]), answer, image_path))
    return _numbered(rows)


def _image_bytes(value: Any, file: Path) -> bytes:
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return value["bytes"]
    raise EvalInputError(f"MME parquet {str(file)!r}: an image cell is not {{bytes, path}}; re-export the dataset "
                         "with its images embedded.")


def _numbered(rows: Sequence[tuple[str, str, str, str, Path | None]]) -> list[MmeQuestion]:
    """Questions in (subtask, image) order, the Yes question first within an image (as the release orders them,
    whatever the source's row order), then file order; keys 0..n-1."""
    ordered = sorted(enumerate(rows), key=lambda pair: (pair[1][0], pair[1][1], pair[1][3] != YES, pair[0]))
    questions = [MmeQuestion(key, *row) for key, (_, row) in enumerate(ordered)]
    check_pairs(questions)
    return questions


def check_pairs(questions: Sequence[MmeQuestion]) -> dict[tuple[str, str], list[MmeQuestion]]:
    """Questions grouped by (subtask, image); not exactly two per image raises."""
    groups: dict[tuple[str, str], list[MmeQuestion]] = defaultdict(list)
    for question in questions:
        groups[(question.subtask, question.image)].append(question)
    for (subtask, image), group in groups.items():
        if len(group) != 2:
            raise EvalInputError(f"MME {subtask}/{image} has {len(group)} question(s); acc+ pairs each image's two "
                                 "questions, so every image needs exactly two.")
    return groups


def content_sha256(questions: Sequence[MmeQuestion]) -> dict[str, str]:
    """Per subtask: sha256 of its sorted (subtask, image, question, answer) rows (layout-independent)."""
    by_subtask: dict[str, list[list[str]]] = defaultdict(list)
    for q in questions:
        by_subtask[q.subtask].append([q.subtask, q.image, q.question, q.answer])
    return {subtask: sha256_json(sorted(rows)) for subtask, rows in sorted(by_subtask.items())}


@dataclass(frozen=True)
class SubtaskScores:
    acc: float
    acc_plus: float
    score: float
    other_rate: float
    yes_ratio: float
    n_questions: int
    n_images: int

    def to_json(self) -> dict[str, Any]:
        return {"acc": self.acc, "acc_plus": self.acc_plus, "score": self.score, "other_rate": self.other_rate,
                "unknown_rate": self.other_rate, "yes_ratio": self.yes_ratio, "n_questions": self.n_questions,
                "n_images": self.n_images}


@dataclass(frozen=True)
class MmeScores:
    parser: str
    subtasks: Mapping[str, SubtaskScores]
    total: float
    unknown_rate: float
    yes_ratio: float
    n_missing: int
    predictions: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)  # key -> parsed

    def to_json(self) -> dict[str, Any]:
        return {"parser": self.parser, "total": self.total, "unknown_rate": self.unknown_rate,
                "yes_ratio": self.yes_ratio, "n_missing": self.n_missing,
                "subtasks": {name: s.to_json() for name, s in self.subtasks.items()}}


def score_mme(questions: Sequence[MmeQuestion], answers: Mapping[int, str],
              parser: str = "mme_official") -> MmeScores:
    """Score raw answers (question key -> text). An image with a missing answer counts as not both correct
    (its answered question still counts in acc); `n_missing` says how many answers are missing."""
    answer_parser = get_parser(parser)
    groups = check_pairs(questions)
    known = {q.key for q in questions}
    stray = sorted(set(answers) - known)
    if stray:
        raise EvalInputError(f"answers for key(s) {stray[:10]} have no MME question; score answers against the "
                             "questions they were generated from.")
    if not answers:
        raise EvalInputError("no MME answer to score; check that generation ran.")
    labels = {q.key: q.answer for q in questions}
    predictions = {k: answer_parser(text, labels[k]) for k, text in answers.items()}
    per_subtask: dict[str, list[list[MmeQuestion]]] = defaultdict(list)
    for (subtask, _), group in groups.items():
        per_subtask[subtask].append(group)
    subtasks = {}
    for subtask in sorted(per_subtask):
        images = per_subtask[subtask]
        asked = [q for group in images for q in group if q.key in predictions]
        correct = {q.key for q in asked if predictions[q.key] == q.answer}
        both = sum(all(q.key in correct for q in group) for group in images)
        rates = answer_rates([predictions[q.key] for q in asked])
        acc = len(correct) / len(asked) if asked else 0.0
        acc_plus = both / len(images)
        subtasks[subtask] = SubtaskScores(acc, acc_plus, 100 * acc + 100 * acc_plus, rates.unknown_rate,
                                          rates.yes_ratio, len(asked), len(images))
    rates = answer_rates(list(predictions.values()))
    return MmeScores(parser, subtasks, sum(s.score for s in subtasks.values()), rates.unknown_rate,
                     rates.yes_ratio, len(questions) - len(predictions), predictions)


def mme_scored(questions: Sequence[MmeQuestion], answers: Mapping[int, str], scores: MmeScores) -> dict[str, Any]:
    """Per question (in key order): its subtask, image, question, label, the raw answer, the parsed answer and
    whether the scorer counted it correct (None: no answer); per image pair, whether both were correct (acc+)."""
    rows = [{"key": q.key, "subtask": q.subtask, "image": q.image, "question": q.question, "answer": q.answer,
             "text": answers.get(q.key), "parsed": scores.predictions.get(q.key),
             "correct": scores.predictions[q.key] == q.answer if q.key in scores.predictions else None}
            for q in questions]
    both = {f"{subtask}/{image}": all(scores.predictions.get(q.key) == q.answer for q in group)
            for (subtask, image), group in check_pairs(questions).items()}
    return {"scores": scores.to_json(), "questions": rows, "pairs_both_correct": both}


def write_mme_scored(path: PathLike, questions: Sequence[MmeQuestion], answers: Mapping[int, str],
                     scores: MmeScores) -> None:
    """Write `mme_scored.json` (`mme_scored`)."""
    atomic_write_text(path, json.dumps(mme_scored(questions, answers, scores), indent=1, ensure_ascii=False) + "\n")
