"""HallusionBench (Guan et al., CVPR 2024; spec Part C), scored without a GPT judge.

`HallusionBench.json` holds 1,129 questions (951 with an image, 178 text-only, all VS with figure_id "0").
The official correctness comes from a GPT-4 judge; vlmfix uses a rule instead (`hallusion.parser`, default
`vlmevalkit_yorn`, an exact port of VLMEvalKit's `YOrN_Extraction`): yes <-> gt "1", no <-> gt "0", and
**unknown <-> the judge's "unclear"**, which the official `assign_correctness` counts correct on VS questions
without an image (knob `unknown_no_visual: correct | wrong`) and wrong elsewhere.

* aAcc = correct / questions.
* fAcc = figures whose questions are all correct / figures; figure key category_subcategory_set_figure; the
  VS no-image "figure" 0 is skipped.
* qAcc = question groups all correct / groups; group key category_subcategory_set_question.
* easy / hard = the qAcc rule on the questions with visual_input != "2" / == "2" (per group, despite the name).
* per category and subcategory aAcc; unknown_rate (overall and per category); predicted yes_ratio.
  LH / VI / Mixed need a judge and are omitted; results say `judge: rule:<parser>`,
  `comparable_to_leaderboard: false`.

Text-only questions (no `filename`) are decoded without methods by the app; here they are counted apart
(`n_text_only`, and aAcc of the image and text-only questions separately).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.eval._io import PathLike, atomic_write_text, read_json, sha256_file, sha256_json
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.yesno import NO, UNKNOWN, YES, answer_rates, get_parser

UNKNOWN_NO_VISUAL = ("correct", "wrong")
FIELDS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "question", "gt_answer")
SOURCE = ("a clone of github.com/tianyi-lab/HallusionBench (HallusionBench.json) plus hallusion_bench.zip from "
          "its README, unzipped beside it (hallusion_bench/{VD,VS}/...)")


@dataclass(frozen=True)
class HallusionQuestion:
    """One question; `key` is its position in HallusionBench.json, `image_path` None for text-only rows."""

    key: int
    category: str
    subcategory: str
    visual_input: str
    set_id: str
    figure_id: str
    question_id: str
    question: str
    gt_answer: str
    image_path: Path | None = None

    @property
    def figure_key(self) -> str:
        return f"{self.category}_{self.subcategory}_{self.set_id}_{self.figure_id}"

    @property
    def group_key(self) -> str:
        return f"{self.category}_{self.subcategory}_{self.set_id}_{self.question_id}"

    @property
    def no_visual(self) -> bool:
        """A VS question without an image (figure "0"): the official rule counts "unclear" correct here."""
        return self.category == "VS" and self.figure_id == "0"


def questions_from_rows(rows: Any, image_root: Path | None, where: str) -> list[HallusionQuestion]:
    """Checked questions; `filename` "./VD/illusion/0_0.png" (or "./hallusion_bench/VD/...") is resolved under
    `image_root`, the unzipped hallusion_bench/ folder."""
    if not isinstance(rows, list) or not rows:
        raise EvalInputError(f"{where} must be a non-empty JSON list of question objects.")
    questions = []
    for index, row in enumerate(rows):
        at = f"{where}, entry {index}"
        if not isinstance(row, dict) or any(key not in row for key in FIELDS):
            raise EvalInputError(f"{at} needs the fields {', '.join(FIELDS)} (HallusionBench.json).")
        values = {key: str(row[key]) for key in FIELDS}
        if values["gt_answer"] not in ("0", "1"):
            raise EvalInputError(f"{at}: gt_answer must be '1' (yes) or '0' (no), got {row['gt_answer']!r}.")
        filename = row.get("filename")
        image_path = None
        if filename:
            relative = str(filename).removeprefix("./").removeprefix("hallusion_bench/")
            image_path = (image_root / relative) if image_root is not None else Path(relative)
        questions.append(HallusionQuestion(index, **values, image_path=image_path))
    return questions


def load_hallusion(path: PathLike, image_root: PathLike | None = None) -> list[HallusionQuestion]:
    """Read HallusionBench.json; `path` may be the file or the folder holding it (and hallusion_bench/)."""
    path = Path(path).expanduser()
    file = path / "HallusionBench.json" if path.is_dir() else path
    if not file.is_file():
        raise EvalInputError(f"HallusionBench file {str(file)!r} does not exist; expected HallusionBench.json and "
                             f"the unzipped hallusion_bench/{{VD,VS}}/ beside it, from {SOURCE}.")
    root = Path(image_root) if image_root is not None else file.parent / "hallusion_bench"
    return questions_from_rows(read_json(file, "HallusionBench"), root, str(file))


def load_hallusion_hf(source: PathLike, image_dir: PathLike | None = None) -> list[HallusionQuestion]:
    """Questions from local parquet files of the HF dataset lmms-lab/HallusionBench (splits `image` and
    `non_image`: the JSON fields plus `image`), files in name order. With `image_dir`, each image is written there
    once under its `filename` (so the generation reads files); rows without an image are text-only."""
    import pyarrow.parquet as pq

    path = Path(source).expanduser()
    if not path.exists():
        raise EvalInputError(f"HallusionBench copy {str(path)!r} does not exist; vlmfix reads local copies only.")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise EvalInputError(f"HallusionBench copy {str(path)!r} holds no parquet files.")
    rows: list[dict[str, Any]] = []
    images: list[Any] = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            images.append(row.pop("image", None))
            rows.append(row)
    questions = questions_from_rows(rows, Path(image_dir) if image_dir is not None else None, str(path))
    for question, image in zip(questions, images):
        if question.image_path is None or image_dir is None or question.image_path.is_file():
            continue
        if not (isinstance(image, dict) and isinstance(image.get("bytes"), bytes)):
            raise EvalInputError(f"HallusionBench copy {str(path)!r}: the image of question key {question.key} is not "
                                 "{bytes, path}; re-export the dataset with its images embedded.")
        question.image_path.parent.mkdir(parents=True, exist_ok=True)
        question.image_path.write_bytes(image["bytes"])
    return questions


def file_hashes(path: PathLike, questions: Sequence[HallusionQuestion]) -> dict[str, str | None]:
    """The file's byte hash (None for a parquet copy) and the content hash of its question fields (for the
    fingerprint)."""
    path = Path(path)
    file = path / "HallusionBench.json" if path.is_dir() else path
    content = sha256_json([[getattr(q, key) for key in FIELDS] for q in questions])
    return {"file_sha256": sha256_file(file) if file.is_file() else None, "content_sha256": content}


@dataclass(frozen=True)
class HallusionScores:
    parser: str
    unknown_no_visual: str
    aacc: float
    facc: float
    qacc: float
    easy_aacc: float
    hard_aacc: float
    by_category: Mapping[str, Mapping[str, float]]
    by_subcategory: Mapping[str, float]
    image_aacc: float
    text_only_aacc: float
    unknown_rate: float
    yes_ratio: float
    n_questions: int
    n_text_only: int
    n_missing: int
    predictions: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)  # key -> parsed
    correct: Mapping[int, bool] = field(default_factory=dict, repr=False, compare=False)  # key -> scored correct

    def to_json(self) -> dict[str, Any]:
        return {"parser": self.parser, "judge": f"rule:{self.parser}", "comparable_to_leaderboard": False,
                "unknown_no_visual": self.unknown_no_visual, "aAcc": self.aacc, "fAcc": self.facc,
                "qAcc": self.qacc, "easy_aAcc": self.easy_aacc, "hard_aAcc": self.hard_aacc,
                "by_category": {k: dict(v) for k, v in self.by_category.items()},
                "by_subcategory": dict(self.by_subcategory), "image_aAcc": self.image_aacc,
                "text_only_aAcc": self.text_only_aacc, "unknown_rate": self.unknown_rate,
                "yes_ratio": self.yes_ratio, "n_questions": self.n_questions, "n_text_only": self.n_text_only,
                "n_missing": self.n_missing}


def score_hallusion(questions: Sequence[HallusionQuestion], answers: Mapping[int, str],
                    parser: str = "vlmevalkit_yorn", unknown_no_visual: str = "correct") -> HallusionScores:
    """Score raw answers (question key -> text); a question without an answer counts as wrong in its figure and
    group and is left out of aAcc (`n_missing` says how many)."""
    answer_parser = get_parser(parser)
    if unknown_no_visual not in UNKNOWN_NO_VISUAL:
        raise EvalInputError(f"`hallusion.unknown_no_visual` must be correct or wrong, got {unknown_no_visual!r}.")
    by_key = {q.key: q for q in questions}
    stray = sorted(set(answers) - set(by_key))
    if stray:
        raise EvalInputError(f"answers for key(s) {stray[:10]} have no HallusionBench question.")
    if not answers:
        raise EvalInputError("no HallusionBench answer to score; check that generation ran.")
    predictions = {key: answer_parser(text, YES if by_key[key].gt_answer == "1" else NO)
                   for key, text in answers.items()}

    def correct(q: HallusionQuestion) -> bool:
        prediction = predictions.get(q.key)
        if prediction is None:
            return False
        if prediction == UNKNOWN:
            return q.no_visual and unknown_no_visual == "correct"
        return (prediction == YES) == (q.gt_answer == "1") and prediction in (YES, NO)

    answered = [q for q in questions if q.key in predictions]
    rates = answer_rates([predictions[q.key] for q in answered])
    by_category = {}
    for category in sorted({q.category for q in answered}):
        members = [q for q in answered if q.category == category]
        by_category[category] = {"aAcc": _share(members, correct),
                                 "unknown_rate": answer_rates([predictions[q.key] for q in members]).unknown_rate}
    by_subcategory = {f"{c}_{s}": _share([q for q in answered if (q.category, q.subcategory) == (c, s)], correct)
                      for c, s in sorted({(q.category, q.subcategory) for q in answered})}
    text_only = [q for q in answered if q.image_path is None]
    return HallusionScores(
        parser=parser, unknown_no_visual=unknown_no_visual,
        aacc=_share(answered, correct),
        facc=_all_correct_share([q for q in questions if not q.no_visual], lambda q: q.figure_key, correct),
        qacc=_all_correct_share(questions, lambda q: q.group_key, correct),
        easy_aacc=_all_correct_share([q for q in questions if q.visual_input != "2"], lambda q: q.group_key, correct),
        hard_aacc=_all_correct_share([q for q in questions if q.visual_input == "2"], lambda q: q.group_key, correct),
        by_category=by_category,
        image_aacc=_share([q for q in answered if q.image_path is not None], correct),
        text_only_aacc=_share(text_only, correct),
        by_subcategory=by_subcategory, unknown_rate=rates.unknown_rate, yes_ratio=rates.yes_ratio,
        n_questions=len(questions), n_text_only=sum(q.image_path is None for q in questions),
        n_missing=len(questions) - len(answered),
        predictions=predictions, correct={q.key: correct(q) for q in questions},
    )


def _share(questions: Sequence[HallusionQuestion], correct: Callable[[HallusionQuestion], bool]) -> float:
    return sum(map(correct, questions)) / len(questions) if questions else 0.0


def _all_correct_share(questions: Sequence[HallusionQuestion], key: Callable[[HallusionQuestion], str],
                       correct: Callable[[HallusionQuestion], bool]) -> float:
    groups: dict[str, bool] = defaultdict(lambda: True)
    for q in questions:
        groups[key(q)] = groups[key(q)] and correct(q)
    return sum(groups.values()) / len(groups) if groups else 0.0


def hallusion_scored(questions: Sequence[HallusionQuestion], answers: Mapping[int, str],
                     scores: HallusionScores) -> dict[str, Any]:
    """Per question (in key order): its fields, the expected answer (yes / no), the raw answer, the parsed one
    (`unknown`: the judge's "unclear") and whether the scorer counted it correct (a missing answer: wrong)."""
    rows = [{"key": q.key, "category": q.category, "subcategory": q.subcategory, "set_id": q.set_id,
             "figure_id": q.figure_id, "question_id": q.question_id, "visual_input": q.visual_input,
             "question": q.question, "answer": YES if q.gt_answer == "1" else NO, "no_visual": q.no_visual,
             "text_only": q.image_path is None, "text": answers.get(q.key), "parsed": scores.predictions.get(q.key),
             "correct": scores.correct[q.key]} for q in questions]
    return {"scores": scores.to_json(), "questions": rows}


def write_hallusion_scored(path: PathLike, questions: Sequence[HallusionQuestion], answers: Mapping[int, str],
                           scores: HallusionScores) -> None:
    """Write `hallusion_scored.json` (`hallusion_scored`)."""
    text = json.dumps(hallusion_scored(questions, answers, scores), indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)
