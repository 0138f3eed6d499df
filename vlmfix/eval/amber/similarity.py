"""AMBER's word-similarity step (spec A3): which backend answers `similarity(a, b)` for two words of V.

The official scorer calls spaCy `en_core_web_lg` (`nlp(a).similarity(nlp(b)) > 0.8`). spaCy models are not on
PyPI, so vlmfix never needs one: the choice is explicit and recorded.

* `official` (default): spaCy with `en_core_web_lg` when both are importable; else the shipped table made from
  that model (`vlmfix/eval/data/amber_similarity_en_core_web_lg-*.json`, same numbers by construction). With
  neither, `make_similarity` raises `SimilarityUnavailableError` naming the install commands and the explicit
  alternative `similarity=none` (never chosen silently).
* `table`: a similarity table file (`--table PATH`, or the shipped one).
* `spacy`: any installed spaCy model (`spacy_model=<name>`); not lg -> `comparable_to_official: false`.
* `none`: exact matches only (similarity 1 for equal words, else 0). Per response CHAIR and Hal can only rise,
  Cover and Cog only fall against `official` (similarity only adds credits); `comparable_to_official: false`.

Every backend returns 1.0 for two equal words (spaCy does, vectors or not) and has `describe()`, the plain
data that goes into the fingerprint and is printed with the result.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vlmfix.errors import VlmfixError
from vlmfix.eval._io import PathLike, read_json, sha256_file, sha256_json
from vlmfix.eval.errors import EvalInputError

BACKENDS = ("official", "table", "spacy", "none")
OFFICIAL_MODEL = "en_core_web_lg"
TABLE_DIR = Path(__file__).resolve().parent.parent / "data"
TABLE_PATTERN = f"amber_similarity_{OFFICIAL_MODEL}-*.json"
TABLE_FORMAT = 1


class SimilarityUnavailableError(VlmfixError, RuntimeError):
    """The chosen AMBER similarity backend needs spaCy, a spaCy model or a table that is not installed."""


class Similarity(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def comparable_to_official(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def __call__(self, a: str, b: str) -> float: ...


@dataclass(frozen=True)
class NoSimilarity:
    """`similarity=none`: exact matches only."""

    name: str = "none"

    @property
    def comparable_to_official(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"similarity": self.name, "comparable_to_official": False}

    def __call__(self, a: str, b: str) -> float:
        return 1.0 if a == b else 0.0


@dataclass(frozen=True)
class TableSimilarity:
    """A table of similarities over V x V: pairs below the table's floor read as 0 (spec A3 `table`).

    File: `{"format": 1, "header": {spacy_version, model, model_version, vectors, vocabulary_sha256, floor},
    "pairs": [[a, b, similarity], ...]}` with each unordered pair of distinct words once.
    """

    header: Mapping[str, Any]
    pairs: Mapping[frozenset[str], float] = field(repr=False)
    sha256: str
    path: str
    name: str = "table"
    via_official: bool = False

    @property
    def comparable_to_official(self) -> bool:
        return self.header.get("model") == OFFICIAL_MODEL

    @property
    def floor(self) -> float:
        return float(self.header["floor"])

    def describe(self) -> dict[str, Any]:
        return {"similarity": "official" if self.via_official else self.name, "backend": "table",
                "table_sha256": self.sha256, "table": Path(self.path).name, **dict(self.header),
                "comparable_to_official": self.comparable_to_official}

    def __call__(self, a: str, b: str) -> float:
        return 1.0 if a == b else self.pairs.get(frozenset((a, b)), 0.0)


def read_table(path: PathLike, via_official: bool = False) -> TableSimilarity:
    document = read_json(path, "AMBER similarity table")
    where = f"AMBER similarity table {str(path)!r}"
    if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
        raise EvalInputError(f"{where} is not a format-{TABLE_FORMAT} table; rebuild it with "
                             "`python -m vlmfix.eval.amber.similarity_table`.")
    header = document.get("header")
    needed = ("model", "vocabulary_sha256", "floor")
    if not isinstance(header, dict) or any(key not in header for key in needed):
        raise EvalInputError(f"{where}: its header needs {', '.join(needed)}.")
    pairs: dict[frozenset[str], float] = {}
    for row in document.get("pairs", []):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], (int, float))):
            raise EvalInputError(f"{where}: pairs must be [word, word, similarity] rows, got {row!r}.")
        pairs[frozenset(row[:2])] = float(row[2])
    return TableSimilarity(header, pairs, sha256_file(path), str(path), via_official=via_official)


def write_table(path: PathLike, words: Iterable[str], similarity: Callable[[str, str], float],
                header: Mapping[str, Any], floor: float = 0.5) -> Path:
    """Write the table of every unordered pair of distinct `words` with similarity >= `floor`."""
    vocabulary = sorted(set(words))
    rows = []
    for i, a in enumerate(vocabulary):
        for b in vocabulary[i + 1 :]:
            value = float(similarity(a, b))
            if value >= floor:
                rows.append([a, b, round(value, 6)])
    document = {"format": TABLE_FORMAT,
                "header": {**dict(header), "vocabulary_sha256": sha256_json(vocabulary), "floor": floor},
                "pairs": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class SpacySimilarity:
    """spaCy's `Doc.similarity` with an installed model, UserWarnings silenced as the official script does."""

    name = "spacy"

    def __init__(self, model: str, via_official: bool = False) -> None:
        self._spacy = _import_spacy(model)
        try:
            self._nlp = self._spacy.load(model)
        except OSError as err:
            raise SimilarityUnavailableError(_missing_model(model)) from err
        self.model = model
        self.via_official = via_official
        self._docs: dict[str, Any] = {}

    @property
    def comparable_to_official(self) -> bool:
        return self.model == OFFICIAL_MODEL

    def describe(self) -> dict[str, Any]:
        meta = getattr(self._nlp, "meta", {}) or {}
        return {"similarity": "official" if self.via_official else self.name, "backend": "spacy",
                "spacy_version": str(self._spacy.__version__), "model": self.model,
                "model_version": meta.get("version"), "vectors": (meta.get("vectors") or {}).get("name"),
                "comparable_to_official": self.comparable_to_official}

    def _doc(self, word: str) -> Any:
        if word not in self._docs:
            self._docs[word] = self._nlp(word)
        return self._docs[word]

    def __call__(self, a: str, b: str) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(self._doc(a).similarity(self._doc(b)))


def shipped_table() -> Path | None:
    """The newest shipped table made from en_core_web_lg, or None (building it is a maintainer task)."""
    tables = sorted(TABLE_DIR.glob(TABLE_PATTERN))
    return tables[-1] if tables else None


def make_similarity(backend: str = "official", *, spacy_model: str | None = None, table: PathLike | None = None,
                    threshold: float = 0.8, vocabulary_sha256: str | None = None) -> Similarity:
    """The similarity backend `backend` (see the module docstring), checked before any model loads.

    Args:
        backend: official, table, spacy or none.
        spacy_model: the model of `spacy` (required there).
        table: the table file of `table` (default: the shipped one).
        threshold: the similarity threshold that will be used; below a table's floor it is refused.
        vocabulary_sha256: sha256 of the data's sorted V; a table made for another V is refused.
    """
    if backend not in BACKENDS:
        raise EvalInputError(f"`amber.similarity` must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "none":
        return NoSimilarity()
    if backend == "spacy":
        if not spacy_model:
            raise EvalInputError("`amber.similarity=spacy` needs `amber.spacy_model=<an installed spaCy model>`.")
        return SpacySimilarity(spacy_model)
    if backend == "official" and _official_model_installed():
        return SpacySimilarity(OFFICIAL_MODEL, via_official=True)
    path = Path(table) if table is not None else shipped_table()
    if path is None:
        raise SimilarityUnavailableError(
            f"amber.similarity={backend!r} needs spaCy with {OFFICIAL_MODEL} or the similarity table made from "
            f"it, and neither is installed. On a machine with internet: `pip install spacy` and `python -m spacy "
            f"download {OFFICIAL_MODEL}` (or `pip install <the {OFFICIAL_MODEL} wheel>`); or pass a table with "
            "amber.similarity=table amber.table=<file>. Or choose exact matches only with amber.similarity=none "
            "(CHAIR and Hal can only rise, Cover and Cog only fall; not comparable to the official numbers)."
        )
    result = read_table(path, via_official=backend == "official")
    if vocabulary_sha256 is not None and result.header["vocabulary_sha256"] != vocabulary_sha256:
        raise EvalInputError(f"AMBER similarity table {str(path)!r} was made for another vocabulary (sha256 "
                             f"{str(result.header['vocabulary_sha256'])[:12]}..., the data's V is "
                             f"{vocabulary_sha256[:12]}...); rebuild it from this relation.json.")
    if threshold < result.floor:
        raise EvalInputError(f"`amber.threshold` {threshold} is below the table's floor {result.floor}: pairs "
                             "under the floor are not stored; use a threshold >= the floor or spaCy itself.")
    return result


def _official_model_installed() -> bool:
    try:
        import spacy.util
    except ImportError:
        return False
    return bool(spacy.util.is_package(OFFICIAL_MODEL))


def _import_spacy(model: str) -> Any:
    try:
        import spacy
    except ImportError as err:
        raise SimilarityUnavailableError(
            f"amber.similarity=spacy needs the optional package spaCy; `pip install spacy`, then "
            f"{_missing_model(model)}"
        ) from err
    return spacy


def _missing_model(model: str) -> str:
    return (f"the spaCy model {model!r} is not installed: on a machine with internet run `python -m spacy download "
            f"{model}` (or `pip install <its wheel>`); vlmfix never downloads it. Or choose amber.similarity=none.")
