"""POPE question files (spec B1, B2): read, write, and identify the released versions by content hash.

Released COCO files are JSON Lines despite their `.json` extension; the SEEM-based A-OKVQA / GQA files are
JSON arrays. `read_questions` sniffs the content (UTF-8 only), rejects empty files, duplicate ids and labels
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
from vlmfix.eval._io import PathLike, as_id, atomic_write_text, jsonl_text, read_records, sha256_file, shown
from vlmfix.eval.errors import EvalInputError, checked

LABELS = ("yes", "no")
SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class PinnedPopeFile:
    """A released COCO POPE file: its split and the upstream versions that ship exactly this content."""

    split: str
    versions: tuple[str, ...]
    rows: int | None = None


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
        sha256: content hash of the file (recorded in the fingerprint).
        split: the split of a pinned file, else the caller's `split` argument (or None).
        versions: upstream versions with exactly this content; empty for an unknown file.
        path: where it was read from.
    """

    questions: tuple[PopeQuestion, ...]
    sha256: str
    split: str | None
    versions: tuple[str, ...]
    path: str


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


def load_question_file(path: PathLike, split: str | None = None) -> QuestionFile:
    """Read a question file and identify it by content hash; an unknown hash loads with a warning."""
    questions = read_questions(path)
    digest = sha256_file(path)
    pinned = PINNED_FILES.get(digest)
    if pinned is None:
        warnings.warn(
            f"POPE question file {str(path)!r} (sha256 {digest[:16]}...) is not one of the pinned released "
            "files; its hash is recorded with the results.",
            stacklevel=2,
        )
        return QuestionFile(tuple(questions), digest, split, (), str(path))
    if split is not None and split != pinned.split:
        raise EvalInputError(
            f"POPE question file {str(path)!r} is the released {pinned.split!r} split, but split={split!r} "
            "was asked for; pass the file of that split."
        )
    return QuestionFile(tuple(questions), digest, pinned.split, pinned.versions, str(path))


def write_questions(path: PathLike, questions: Iterable[PopeQuestion]) -> Path:
    """Write questions as JSON Lines (one `to_json()` row per line), atomically."""
    questions = list(questions)
    check_unique_ids(questions, f"questions for {str(path)!r}")
    return atomic_write_text(path, jsonl_text(q.to_json() for q in questions))
