"""Read a local copy of the lmms-eval POPE dataset (`lmms-lab/POPE` schema) through `datasets` (spec B7).

Offline only: pass local parquet files, a folder holding them (e.g. a hub snapshot made elsewhere with
`huggingface-cli download lmms-lab/POPE --repo-type dataset --local-dir DIR`), or a `save_to_disk` folder.
Nothing is ever downloaded; a hub id is refused.

Schema: `id` (str), `question_id` (str), `question`, `answer` ("yes"/"no"), `image_source` (e.g.
"COCO_val2014_000000310196"), `image` (decoded image), `category` (split name). Mapping: text <- question,
label <- answer, image <- image_source + ".jpg", question_id <- int(question_id), split <- category.
The dataset card does not state its POPE version; pass the pinned question files to classify it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from vlmfix.eval._io import PathLike
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.pope.questions import (
    CONTENT_PINS,
    SPLITS,
    PopeQuestion,
    QuestionFile,
    check_unique_ids,
    question_from_row,
    questions_sha256,
)

HF_COLUMNS = ("question_id", "question", "answer", "image_source", "category")


@dataclass(frozen=True)
class HFPopeSplit:
    """One split of a local lmms-lab/POPE copy: its questions and lazy access to the decoded images.

    Args:
        split: random / popular / adversarial.
        questions: in dataset order.
        content_sha256: sha256 of the canonical (question_id, image, text, label) rows (for the fingerprint).
        versions: upstream versions whose pinned file has exactly these rows; empty when unknown or unchecked.
    """

    split: str
    questions: tuple[PopeQuestion, ...]
    content_sha256: str
    versions: tuple[str, ...]
    _dataset: Any = field(repr=False)
    _rows: Mapping[int, int] = field(repr=False)

    def image(self, question_id: int) -> Any:
        """The decoded image (PIL) of a question."""
        if question_id not in self._rows:
            raise EvalInputError(
                f"question_id {question_id} is not in the {self.split!r} split of this POPE copy."
            )
        return self._dataset[self._rows[question_id]]["image"]


def load_hf_pope(
    source: PathLike | Sequence[PathLike],
    split: str,
    pinned: Sequence[QuestionFile] = (),
    cache_dir: PathLike | None = None,
) -> HFPopeSplit:
    """Load one split of a local lmms-lab/POPE copy.

    Args:
        source: a parquet file, a list of them, a folder with parquet files (searched recursively), or a
            `save_to_disk` folder. Rows of every config are filtered by their `category` column.
        split: random, popular or adversarial.
        pinned: loaded pinned question files (`load_question_file`); the split's version is the one whose rows
            (question_id, image, text, label) are identical. Without them, the rows' content hash is looked up
            in the released files' pins (`CONTENT_PINS`), in order (the copy's row order must match).
        cache_dir: `datasets` cache folder for the parquet conversion (default: its usual cache).
    """
    if split not in SPLITS:
        raise EvalInputError(f"`split` must be one of {', '.join(SPLITS)}, got {split!r}.")
    dataset = _open_local(source, cache_dir)
    missing = [column for column in (*HF_COLUMNS, "image") if column not in dataset.column_names]
    if missing:
        raise EvalInputError(
            f"POPE copy {source!r} lacks the column(s) {', '.join(missing)}; expected the lmms-lab/POPE "
            f"schema {', '.join((*HF_COLUMNS, 'image'))}."
        )
    table = dataset.select_columns(list(HF_COLUMNS)).to_dict()  # no image decoding here
    rows: dict[int, int] = {}
    questions: list[PopeQuestion] = []
    for index, category in enumerate(table["category"]):
        if category != split:
            continue
        row = {
            "question_id": table["question_id"][index],
            "image": f"{table['image_source'][index]}.jpg",
            "text": table["question"][index],
            "label": table["answer"][index],
        }
        question = question_from_row(row, f"POPE copy row {index}")
        questions.append(question)
        rows[question.question_id] = index
    if not questions:
        found = sorted(set(table["category"]))
        raise EvalInputError(
            f"POPE copy {source!r} has no rows of split {split!r}; its categories are {found}."
        )
    check_unique_ids(questions, f"POPE copy, split {split!r}")
    content = questions_sha256(questions)
    known = CONTENT_PINS.get(content)
    versions: tuple[str, ...] = known.versions if known is not None and known.split == split else ()
    for question_file in pinned:
        if question_file.split == split and _same_rows(question_file.questions, questions):
            versions = question_file.versions
    return HFPopeSplit(split, tuple(questions), content, versions, dataset, rows)


def _same_rows(a: Sequence[PopeQuestion], b: Sequence[PopeQuestion]) -> bool:
    key = lambda q: (q.question_id, q.image, q.text, q.label)
    return sorted(map(key, a)) == sorted(map(key, b))


def _open_local(source: PathLike | Sequence[PathLike], cache_dir: PathLike | None) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise EvalInputError(
            "reading the lmms-lab/POPE copy needs `datasets`; install it with `pip install datasets`."
        ) from err
    paths = [Path(p) for p in source] if isinstance(source, (list, tuple)) else [Path(cast(PathLike, source))]
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise EvalInputError(
            f"POPE copy {absent[0]!r} is not a local file or folder. vlmfix reads only local copies and "
            "never downloads: on a machine with internet run `huggingface-cli download lmms-lab/POPE "
            "--repo-type dataset --local-dir DIR`, then pass DIR."
        )
    if len(paths) == 1 and paths[0].is_dir() and (paths[0] / "state.json").is_file():
        return datasets.load_from_disk(str(paths[0]))
    files: list[str] = []
    for path in paths:
        files.extend(sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else [str(path)])
    if not files:
        raise EvalInputError(
            f"POPE copy {source!r} holds no parquet files; pass the folder of the dataset snapshot."
        )
    return datasets.Dataset.from_parquet(files, cache_dir=str(cache_dir) if cache_dir is not None else None)
