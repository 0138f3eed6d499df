"""POPE question files (spec B1, B2; hallu_benchmarks.md Part D): read, write, find, and identify the
released versions by content hash.

Released COCO files are JSON Lines despite their `.json` extension; the SEEM-based A-OKVQA / GQA files are
JSON arrays (VCD re-serialized them as JSON Lines, and its COCO copies have LF line ends where RUCAIBox's
have CRLF). A file is identified by the canonical content hash of its (question_id, image, text, label)
rows (`questions_sha256`), whatever its layout or line ends; its byte hash is kept for the fingerprint.

`read_questions` sniffs the content (UTF-8 only), rejects empty files, duplicate ids and labels
other than yes/no, and keeps the extra fields vlmfix writes (`image_id`, `object`) when present. A
`PopeQuestion` checks itself: ids are normalised to int ("42" is 42), the label must be exactly "yes" or
"no" (the reference scorers would count any other label, "Yes" included, as one class silently).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmfix import validation
from vlmfix.eval._io import (
    PathLike,
    as_id,
    atomic_write_text,
    jsonl_text,
    read_records,
    sha256_file,
    sha256_json,
    shown,
)
from vlmfix.eval.errors import EvalInputError, checked

LABELS = ("yes", "no")
SPLITS = ("random", "popular", "adversarial")
DATASETS = ("coco", "aokvqa", "gqa")
# RUCAIBox/POPE commits whose released files are pinned below (chair_pope.md B2, hallu_benchmarks.md Part D)
VERSIONS = ("e3e3926", "edebdda", "9b54106", "head")


@dataclass(frozen=True)
class PinnedPopeFile:
    """A released COCO POPE file: its split and the upstream versions that ship exactly this content."""

    split: str
    versions: tuple[str, ...]
    rows: int | None = None
    dataset: str = "coco"


# sha256 of the released RUCAIBox/POPE COCO files -> (split, versions). `e3e3926` is the 2,910-row random
# split pinned by LLaVA-1.5 and shipped by OPERA; `edebdda` regenerated random to 3,000 rows; `head`
# (= 109985c, 3df3ba1) also fixed the adversarial typos.
PINNED_FILES: Mapping[str, PinnedPopeFile] = {
    "c16b65d2df6d70bb0814c8a4375833d39cdb09928fd936d3fc546491efa37f35": PinnedPopeFile(
        "random", ("e3e3926",), 2910
    ),
    "5b16653023bf4f64d57eb0d168259de6627f5cde7538b85ebed3cc33034aa6cc": PinnedPopeFile(
        "popular", ("e3e3926",)
    ),
    "1d8f0906a9b50c05640f6f23abfac97523be2a1bed28f7eadc63b811699b2d26": PinnedPopeFile(
        "adversarial", ("e3e3926",)
    ),
    "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994": PinnedPopeFile(
        "random", ("edebdda", "head"), 3000
    ),
    "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753": PinnedPopeFile(
        "popular", ("edebdda", "head")
    ),
    "207273ac3b7fdd04df206c6809b77a4e7f60360a730ade6b7e32804e8dd5602f": PinnedPopeFile(
        "adversarial", ("edebdda",)
    ),
    "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8": PinnedPopeFile(
        "adversarial", ("head",)
    ),
}


# Canonical content hash (`questions_sha256`) of the released files -> what they are (RUCAIBox/POPE at
# e3e3926, edebdda, 9b54106 and head; computed from the files, and equal to the spec's pins). VCD's JSON Lines
# copies (other bytes, same rows) map to the same entries.
CONTENT_PINS: Mapping[str, PinnedPopeFile] = {
    "ebbebf87d1142419298be9aca30a1d2b81e51959c14385dd305e7bda18123676": PinnedPopeFile("random", ("e3e3926",), 2910),
    "e665758c4c3a5c49fbdf5824a3b5093393727db366ebe199b15d5060f0c1ae52": PinnedPopeFile("popular", ("e3e3926",)),
    "3c75c0e1dcf6520f507e046c4e0660ef5ce636f39d63379fddeaf30a1e5faadf": PinnedPopeFile("adversarial", ("e3e3926",)),
    "9999e9a2478b4fd05670defcf85d5e91ffab1df81cd41f6ce6add61dfb5bc28e": PinnedPopeFile(
        "random", ("edebdda", "head"), 3000
    ),
    "2db93c74a6fc72471b96d0254f197ab2a2d4c074f7392f1e3147ca621b0ac7c2": PinnedPopeFile("popular", ("edebdda", "head")),
    "8ecffcc50550857b1c2e0d8aa39355cdfdb888ea87daa87acbe28a6d643d6509": PinnedPopeFile("adversarial", ("edebdda",)),
    "909200aee8458eb4fc3f764bd72526a5d2fc153d2095e91400537ff2caf09d9d": PinnedPopeFile("adversarial", ("head",)),
    "e7f3e0c5163045a5d0ba536fee1fea30c16893bfe740cca6abba5dd2230dbbe8": PinnedPopeFile(
        "random", ("9b54106", "head"), 3000, "aokvqa"
    ),
    "d28ac37966929e67ad4b86056247f9c4a604f2546a4eb8613207fcc8efb945e0": PinnedPopeFile(
        "popular", ("9b54106", "head"), 3000, "aokvqa"
    ),
    "16ecf67827247c8c6f3e31ca1fb731f4dd9e53cad91f2724bce264854688b7ad": PinnedPopeFile(
        "adversarial", ("9b54106", "head"), 3000, "aokvqa"
    ),
    "17684ae1c49ee2d5a3656c58d6fbad0c14d3a7dab6ff459c46bd1c06c8787140": PinnedPopeFile(
        "random", ("9b54106", "head"), 3000, "gqa"
    ),
    "1199529081243c96691902bd075b8146ec80d5fcd0332dd424c865b72dd480ef": PinnedPopeFile(
        "popular", ("9b54106", "head"), 3000, "gqa"
    ),
    "954050ea3d77b0883efa33ccfc263fdfd48f9a67749eb0930047fc0dd8c199f6": PinnedPopeFile(
        "adversarial", ("9b54106", "head"), 3000, "gqa"
    ),
}


@dataclass(frozen=True)
class PopeQuestion:
    """One yes/no question about one image.

    Args:
        question_id: unique within its split (ids start at 1 in the released files); an int, or a digit
            string / whole float normalised to int ("42" -> 42); other values raise, naming their type.
        image: image file name (e.g. "COCO_val2014_000000310196.jpg"), a non-empty string.
        text: the question ("Is there a snowboard in the image?"), a non-empty string.
        label: exactly "yes" or "no"; anything else ("Yes", "unknown", None) raises, naming the id.
        image_id: COCO image id, when known (vlmfix-built files carry it); normalised like question_id.
        object: the object asked about, when known.
    """

    question_id: int
    image: str
    text: str
    label: str
    image_id: int | None = None
    object: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "question_id", as_id(self.question_id, "question_id"))
        where = f"question_id {self.question_id}"
        for name in ("image", "text"):
            try:
                checked(validation.text, getattr(self, name), name)
            except EvalInputError as err:
                raise EvalInputError(f"{where}: {err}") from None
        if not (isinstance(self.label, str) and self.label in LABELS):
            raise EvalInputError(
                f"{where} has label {self.label!r}; labels must be 'yes' or 'no' (lower case, no spaces). Fix "
                "the question file: the reference scorers would silently count any other label as one class."
            )
        if self.image_id is not None:
            object.__setattr__(self, "image_id", as_id(self.image_id, "image_id"))
        if self.object is not None and not isinstance(self.object, str):
            raise EvalInputError(f"{where}: `object` must be None or a string, got {shown(self.object)}.")

    def to_json(self) -> dict[str, Any]:
        """The B1 row (question_id, image, text, label) plus image_id / object when set, in that order."""
        row: dict[str, Any] = {
            "question_id": self.question_id,
            "image": self.image,
            "text": self.text,
            "label": self.label,
        }
        if self.image_id is not None:
            row["image_id"] = self.image_id
        if self.object is not None:
            row["object"] = self.object
        return row


@dataclass(frozen=True)
class QuestionFile:
    """A loaded question file and what it is.

    Args:
        questions: the questions in file order.
        sha256: byte hash of the file (recorded in the fingerprint).
        split: the split of a pinned file, else the caller's `split` argument (or None).
        versions: upstream versions with exactly this content; empty for an unknown file.
        path: where it was read from.
        content_sha256: `questions_sha256` of its rows (what identifies it).
        dataset: coco, aokvqa or gqa for a pinned file, else the caller's `dataset` argument (or None).
    """

    questions: tuple[PopeQuestion, ...]
    sha256: str
    split: str | None
    versions: tuple[str, ...]
    path: str
    content_sha256: str = ""
    dataset: str | None = None


def question_from_row(row: Any, where: str) -> PopeQuestion:
    """Validate one row (a dict with question_id, image, text, label; extras ignored); errors start with `where`."""
    if not isinstance(row, dict):
        raise EvalInputError(f'{where} is not a JSON object; POPE rows look like {{"question_id": 1, ...}}.')
    missing = [key for key in ("question_id", "image", "text", "label") if key not in row]
    if missing:
        raise EvalInputError(
            f"{where} lacks the field(s) {', '.join(missing)}; POPE rows need question_id, image, text and "
            "label."
        )
    try:
        return PopeQuestion(
            question_id=row["question_id"],
            image=row["image"],
            text=row["text"],
            label=row["label"],
            image_id=row.get("image_id"),
            object=row.get("object"),
        )
    except EvalInputError as err:
        raise EvalInputError(f"{where}: {err}") from None


def check_unique_ids(questions: Sequence[PopeQuestion], source: str) -> None:
    duplicates = sorted(i for i, n in Counter(q.question_id for q in questions).items() if n > 1)
    if duplicates:
        raise EvalInputError(
            f"{source} has duplicate question_id(s) {duplicates[:10]}; answers are joined to questions by "
            "id, so each id must appear once per split."
        )


def read_questions(path: PathLike) -> list[PopeQuestion]:
    """Read a POPE question file (JSON Lines or JSON array, whatever the extension)."""
    rows = read_records(path, "POPE question")
    questions = [
        question_from_row(row, f"POPE question file {str(path)!r}, record {i}")
        for i, row in enumerate(rows, start=1)
    ]
    check_unique_ids(questions, f"POPE question file {str(path)!r}")
    return questions


def questions_sha256(questions: Sequence[PopeQuestion]) -> str:
    """Content hash of the B1 fields of questions, in order (independent of file layout and line ends)."""
    return sha256_json([[q.question_id, q.image, q.text, q.label] for q in questions])


def load_question_file(path: PathLike, split: str | None = None, dataset: str | None = None) -> QuestionFile:
    """Read a question file and identify it by content hash; an unknown hash loads with a warning.

    A pinned file of another split or dataset than the one asked for raises.
    """
    questions = read_questions(path)
    digest = sha256_file(path)
    content = questions_sha256(questions)
    pinned = CONTENT_PINS.get(content)
    if pinned is None:
        warnings.warn(
            f"POPE question file {str(path)!r} (content sha256 {content[:16]}...) is not one of the pinned "
            "released files; its hashes are recorded with the results.",
            stacklevel=2,
        )
        return QuestionFile(tuple(questions), digest, split, (), str(path), content, dataset)
    for name, asked, found in (("split", split, pinned.split), ("dataset", dataset, pinned.dataset)):
        if asked is not None and asked != found:
            raise EvalInputError(
                f"POPE question file {str(path)!r} is the released {pinned.dataset} {pinned.split!r} file, but "
                f"{name}={asked!r} was asked for; pass the file of that {name}."
            )
    return QuestionFile(tuple(questions), digest, pinned.split, pinned.versions, str(path), content, pinned.dataset)


# Where a dataset's split lives in a RUCAIBox/POPE clone and in VCD's experiments/data/POPE/ (relative to the
# folder VLMFIX_POPE names; either repository root or the POPE data folder itself).
def question_file_candidates(dataset: str, split: str) -> list[str]:
    if dataset == "coco":  # RUCAIBox/POPE, then OPERA's copy of e3e3926 (shikiw/OPERA pope_coco/)
        names = [f"output/coco/coco_pope_{split}.json", f"pope_coco/coco_pope_{split}.json"]
    else:
        names = [f"output/seem/{dataset}/{dataset}_pope_seem_{split}.json"]
    vcd = f"{dataset}/{dataset}_pope_{split}.json"
    return names + [vcd, f"experiments/data/POPE/{vcd}"]


def find_question_file(root: PathLike, dataset: str, split: str) -> Path:
    """The released question file of `dataset` / `split` under `root` (RUCAIBox/POPE or VCD layout)."""
    if dataset not in DATASETS or split not in SPLITS:
        raise EvalInputError(f"POPE dataset must be one of {', '.join(DATASETS)} and split one of "
                             f"{', '.join(SPLITS)}, got {dataset!r} / {split!r}.")
    root = Path(root).expanduser()
    candidates = question_file_candidates(dataset, split)
    for relative in candidates:
        if (root / relative).is_file():
            return root / relative
    raise EvalInputError(
        f"no POPE {dataset} {split!r} question file under {str(root)!r}; looked for {', '.join(candidates)}. "
        "Point VLMFIX_POPE at a clone of github.com/RUCAIBox/POPE or of github.com/DAMO-NLP-SG/VCD."
    )


def write_questions(path: PathLike, questions: Iterable[PopeQuestion]) -> Path:
    """Write questions as JSON Lines (one `to_json()` row per line), atomically."""
    questions = list(questions)
    check_unique_ids(questions, f"questions for {str(path)!r}")
    return atomic_write_text(path, jsonl_text(q.to_json() for q in questions))
