"""AMBER's released files (spec A1), read and checked: `data/annotations.json`, `data/relation.json`,
`data/safe_words.txt` and `data/query/query_*.json` of a clone of junyangwang0410/AMBER, images under
`image/AMBER_<id>.jpg` (the authors' image zip). Nothing is downloaded.

```python
data = load_amber("/data/AMBER")            # the folder holding data/ (and image/)
data.entry(1).truth, data.vocabulary         # annotations by id; V = relation keys and values
queries = data.queries("generative")         # [AmberQuery(id=1, image="AMBER_1.jpg", query="Describe this image.")]
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmfix.eval._io import PathLike, read_json, read_text, sha256_file, sha256_json
from vlmfix.eval.errors import EvalInputError

GENERATIVE = "generative"
EXISTENCE = "discriminative-hallucination"
ATTRIBUTE_TYPES = ("discriminative-attribute-state", "discriminative-attribute-number",
                   "discriminative-attribute-action")
RELATION_TYPES = ("discriminative-relation", "relation")
QUERY_SETS = ("all", "generative", "discriminative", "discriminative-existence", "discriminative-attribute",
              "discriminative-relation")
SOURCE = ("a clone of github.com/junyangwang0410/AMBER (its data/ folder) plus the authors' image zip linked "
          "from its README, unzipped to image/")


@dataclass(frozen=True)
class AmberEntry:
    """One annotation: `truth` is a list of present objects (generative) or "yes"/"no" (discriminative)."""

    id: int
    type: str
    truth: tuple[str, ...] | str
    hallu: tuple[str, ...] = ()

    @property
    def generative(self) -> bool:
        return self.type == GENERATIVE


@dataclass(frozen=True)
class AmberQuery:
    id: int
    image: str
    query: str


@dataclass(frozen=True)
class AmberData:
    """The checked AMBER files.

    Args:
        entries: annotations in file order (entry `i` has id `i + 1`, as the scorer indexes them).
        association: relation.json, word -> associated words.
        safe_words: the global safe list (never counted as hallucinated).
        query_files: set name -> the query file's rows (only the files present).
        sha256: file name -> sha256 of the file (for the fingerprint).
        root: the folder holding data/ (and image/).
    """

    entries: tuple[AmberEntry, ...]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]
    query_files: Mapping[str, tuple[AmberQuery, ...]]
    sha256: Mapping[str, str]
    root: Path | None = None

    @property
    def vocabulary(self) -> frozenset[str]:
        """V: every relation.json key and value (the words AMBER scores)."""
        return frozenset(self.association) | frozenset(w for words in self.association.values() for w in words)

    @property
    def vocabulary_sha256(self) -> str:
        return sha256_json(sorted(self.vocabulary))

    def entry(self, entry_id: int) -> AmberEntry:
        if not 1 <= entry_id <= len(self.entries):
            raise EvalInputError(f"AMBER id {entry_id} is not in annotations.json (ids 1..{len(self.entries)}).")
        return self.entries[entry_id - 1]

    def queries(self, name: str) -> tuple[AmberQuery, ...]:
        if name not in self.query_files:
            raise EvalInputError(f"AMBER query file query_{name}.json is not under {self.root}/data/query; the "
                                 f"clone holds {sorted(self.query_files)}. Point VLMFIX_AMBER at a full clone.")
        return self.query_files[name]

    def image_path(self, query: AmberQuery) -> Path:
        if self.root is None:
            raise EvalInputError("this AmberData was built in memory and has no image folder.")
        return self.root / "image" / query.image


def entries_from_json(rows: Any, where: str) -> tuple[AmberEntry, ...]:
    """Checked annotation entries; `id` must equal position + 1 (the official scorer reads `gt[id - 1]`)."""
    if not isinstance(rows, list) or not rows:
        raise EvalInputError(f"{where} must be a non-empty JSON list of annotation objects.")
    entries = []
    for index, row in enumerate(rows):
        at = f"{where}, entry {index}"
        if not isinstance(row, dict) or not {"id", "type", "truth"} <= set(row):
            raise EvalInputError(f"{at} needs the fields id, type and truth.")
        if row["id"] != index + 1:
            raise EvalInputError(f"{at} has id {row['id']!r}; AMBER ids are the list position + 1 (the scorer "
                                 "reads annotations[id - 1]), so the file is not AMBER's or was reordered.")
        if row["type"] == GENERATIVE:
            truth, hallu = row["truth"], row.get("hallu", [])
            if not (_words(truth) and _words(hallu)):
                raise EvalInputError(f"{at}: a generative entry's truth and hallu must be lists of words.")
            entries.append(AmberEntry(index + 1, GENERATIVE, tuple(truth), tuple(hallu)))
        else:
            if row["truth"] not in ("yes", "no"):
                raise EvalInputError(f"{at}: a discriminative truth must be 'yes' or 'no', got {row['truth']!r}.")
            entries.append(AmberEntry(index + 1, str(row["type"]), row["truth"]))
    return tuple(entries)


def association_from_json(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and _words(v) for k, v in value.items()):
        raise EvalInputError(f"{where} must be a JSON object word -> list of associated words.")
    return {key: tuple(words) for key, words in value.items()}


def check_association(entries: Sequence[AmberEntry], association: Mapping[str, Sequence[str]], where: str) -> None:
    """Every truth and hallu word is a relation.json key (the official scorer would raise KeyError)."""
    for entry in entries:
        if entry.generative:
            missing = sorted({w for w in (*entry.truth, *entry.hallu) if w not in association})
            if missing:
                raise EvalInputError(f"AMBER id {entry.id}: the word(s) {missing} are not keys of {where}; the "
                                     "annotations and relation.json come from different releases.")


def load_amber(root: PathLike) -> AmberData:
    """Read a local AMBER clone (`root/data/...`; `root` may also be the data/ folder itself)."""
    root = Path(root).expanduser()
    data_dir = root / "data" if (root / "data").is_dir() else root
    if data_dir is root and (root.parent / "image").is_dir():
        root = root.parent
    for name in ("annotations.json", "relation.json", "safe_words.txt"):
        if not (data_dir / name).is_file():
            raise EvalInputError(f"AMBER file {str(data_dir / name)!r} does not exist; expected "
                                 f"{root}/data/{{annotations.json, relation.json, safe_words.txt, query/*.json}} "
                                 f"and image/AMBER_<id>.jpg, from {SOURCE}.")
    entries = entries_from_json(read_json(data_dir / "annotations.json", "AMBER annotations"),
                                str(data_dir / "annotations.json"))
    association = association_from_json(read_json(data_dir / "relation.json", "AMBER relation"),
                                        str(data_dir / "relation.json"))
    check_association(entries, association, str(data_dir / "relation.json"))
    safe = read_text(data_dir / "safe_words.txt", "AMBER safe words")
    sha = {name: sha256_file(data_dir / name) for name in ("annotations.json", "relation.json", "safe_words.txt")}
    queries: dict[str, tuple[AmberQuery, ...]] = {}
    for name in QUERY_SETS:
        path = data_dir / "query" / f"query_{name}.json"
        if path.is_file():
            queries[name] = _queries(read_json(path, "AMBER query"), str(path), len(entries))
            sha[f"query/query_{name}.json"] = sha256_file(path)
    return AmberData(entries, association, frozenset(line.split("\n")[0] for line in safe.splitlines() if line),
                     queries, sha, root)


def _queries(rows: Any, where: str, n_entries: int) -> tuple[AmberQuery, ...]:
    if not isinstance(rows, list) or not rows:
        raise EvalInputError(f"{where} must be a non-empty JSON list of {{id, image, query}} objects.")
    out = []
    for index, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("id"), int) and isinstance(row.get("image"), str)
                and isinstance(row.get("query"), str)):
            raise EvalInputError(f"{where}, row {index} must be {{id: int, image: str, query: str}}.")
        if not 1 <= row["id"] <= n_entries:
            raise EvalInputError(f"{where}, row {index}: id {row['id']} has no annotation (ids 1..{n_entries}).")
        out.append(AmberQuery(row["id"], row["image"], row["query"]))
    return tuple(out)


def _words(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(word, str) for word in value)


def image_number(image: str) -> int:
    """The number of an AMBER image name ("AMBER_12.jpg" -> 12), used to apply `limit` by image id."""
    stem = Path(image).stem
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        raise EvalInputError(f"AMBER image name {image!r} is not AMBER_<number>.<ext>.") from None
