"""Small I/O helpers of `vlmfix.eval`: content hashes, canonical JSON, atomic writes, and the readers of
JSON / JSON Lines / COCO files with the checks of the ids read from them.

Every file is read as UTF-8 (as the JSON standard requires; a leading UTF-8 byte-order mark is skipped). A
file in another encoding (Latin-1, cp1252, UTF-16) is refused with the file name and the first byte that is
not UTF-8, never guessed: a guess would change the captions and answers being scored.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlmfix.eval.errors import EvalInputError

PathLike = str | os.PathLike


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, UTF-8 kept (the input of every vlmfix content hash)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """JSON Lines with keys in the rows' own order (callers build rows in a fixed field order)."""
    return "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)


def shown(value: Any) -> str:
    """`value` with its type, as error messages show a value of the wrong kind: "None (a NoneType)"."""
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def as_id(value: Any, name: str) -> int:
    """An image or question id as an int.

    Accepted: ints (numpy ints too), strings of ASCII digits ("42" -> 42, as ids read from JSON object keys
    or CSV are) and whole finite floats (42.0 -> 42, as pandas writes an int column with gaps). Refused,
    naming the value and its type: bools, other strings ("1.5", "-3", " 1"), fractional or non-finite
    floats, None and containers.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise EvalInputError(
        f"`{name}` must be an int or a string of digits, got {shown(value)}; ids are whole numbers such as "
        "42 or '42'."
    )


def int_keyed(pairs: Iterable[tuple[Any, Any]], name: str, source: str) -> dict[int, Any]:
    """(id, value) pairs as `{int id: value}`, ids normalised by `as_id`; an id given twice raises.

    `name` is the id's name ("image_id"), `source` names the mapping in errors. Two keys for one id (1 and
    "1", or "1" and "01") would silently drop one entry, so they are refused.
    """
    result: dict[int, Any] = {}
    keys: dict[int, Any] = {}
    for key, value in pairs:
        try:
            number = as_id(key, name)
        except EvalInputError as err:
            raise EvalInputError(f"{source}: {err}") from None
        if number in keys:
            raise EvalInputError(
                f"{name} {number} appears more than once in {source} (as {keys[number]!r} and {key!r}); keep "
                "one entry per id."
            )
        keys[number] = key
        result[number] = value
    return result


def read_text(path: PathLike, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark skipped); `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} file {str(path)!r} does not exist; pass the path of an existing file.")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise EvalInputError(
            f"{what} file {str(path)!r} is not UTF-8: byte 0x{data[err.start]:02x} at line {line}, column "
            f"{column} cannot be decoded ({err.reason}). JSON files must be UTF-8; re-encode it, e.g. "
            "`iconv -f latin1 -t utf-8 FILE > FILE.utf8` for a Latin-1 file, and pass the new file."
        ) from None


def read_json(path: PathLike, what: str, **decode: Any) -> Any:
    """One JSON document from a UTF-8 file; an empty or malformed file raises with its name and position.

    `decode` goes to `json.loads` (e.g. `object_pairs_hook`).
    """
    return parse_json(read_text(path, what), path, what, **decode)


def parse_json(text: str, path: PathLike, what: str, **decode: Any) -> Any:
    """`json.loads(text)` for the text of `path`; errors name the file, line and column."""
    if not text.strip():
        raise EvalInputError(f"{what} file {str(path)!r} is empty; pass the file that holds the {what} JSON.")
    try:
        return json.loads(text, **decode)
    except json.JSONDecodeError as err:
        raise EvalInputError(
            f"{what} file {str(path)!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})."
        ) from None


def read_records(path: PathLike, what: str) -> list[Any]:
    """Read a JSON array or JSON Lines file, sniffing the content (not the extension).

    The first non-blank character `[` means one JSON array; anything else means one JSON value per
    non-blank line. `what` names the file in error messages. A file without records (empty, blank or `[]`)
    raises: there is nothing to score.
    """
    text = read_text(path, what)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalInputError(
                f"{what} file {str(path)!r} starts with '[' but is not valid JSON: {err}."
            ) from err
    else:
        lines = enumerate(text.splitlines(), start=1)
        records = [_json_line(line, number, path, what) for number, line in lines if line.strip()]
    if not records:
        raise EvalInputError(
            f"{what} file {str(path)!r} holds no records; it must be a JSON array or JSON Lines with one "
            "object per line. Check that the run that writes it finished."
        )
    return list(records)


def _json_line(line: str, number: int, path: PathLike, what: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalInputError(
            f"{what} file {str(path)!r}, line {number}, is not valid JSON ({err}); the file must be a "
            "JSON array or JSON Lines (one object per line)."
        ) from err


def load_coco(path: PathLike, what: str, purpose: str) -> Any:
    """A `pycocotools.coco.COCO` of a checked COCO-format file (read as UTF-8 by vlmfix, not by pycocotools).

    Checks, each error naming the file and the record: the document is an object; `images`, `categories`
    and `annotations` are lists of objects; image, category and annotation ids are ids (`as_id`, normalised
    to int in place); categories have a string `name`; every annotation's `category_id` is one of the file's
    categories. `purpose` says what needs pycocotools, for the install hint.
    """
    document = read_json(path, what)
    if not isinstance(document, dict):
        raise EvalInputError(
            f"{what} file {str(path)!r} must be a JSON object with COCO lists (images, annotations), got a "
            f"{type(document).__name__}."
        )
    for key in ("images", "categories", "annotations"):
        records = document.get(key, [])
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise EvalInputError(f"{what} file {str(path)!r}: `{key}` must be a list of JSON objects (COCO format).")
    for number, image in enumerate(document.get("images", []), start=1):
        image["id"] = _record_id(image, "id", path, "image number", number)
    category_ids = _category_ids(document.get("categories", []), path)
    for number, annotation in enumerate(document.get("annotations", []), start=1):
        _check_annotation(annotation, number, category_ids, path)
    return _coco_index(document, purpose)


def _category_ids(categories: list[dict[str, Any]], path: PathLike) -> set[int]:
    for number, category in enumerate(categories, start=1):
        category["id"] = _record_id(category, "id", path, "category number", number)
        if not isinstance(category.get("name"), str):
            raise EvalInputError(
                f"category number {number} of {str(path)!r} needs a string `name`, got "
                f"{shown(category.get('name'))}."
            )
    return {category["id"] for category in categories}


def _check_annotation(annotation: dict[str, Any], number: int, category_ids: set[int], path: PathLike) -> None:
    annotation["id"] = _record_id(annotation, "id", path, "annotation number", number)
    annotation["image_id"] = _record_id(annotation, "image_id", path, "annotation", annotation["id"])
    if "category_id" not in annotation:  # caption annotations have none
        return
    annotation["category_id"] = _record_id(annotation, "category_id", path, "annotation", annotation["id"])
    if annotation["category_id"] not in category_ids:
        raise EvalInputError(
            f"annotation {annotation['id']} of {str(path)!r} has category_id {annotation['category_id']}, "
            f"which is not in its categories ({len(category_ids)} listed); add the category or fix the "
            "annotation."
        )


def _record_id(record: Mapping[str, Any], key: str, path: PathLike, kind: str, number: int) -> int:
    value = record.get(key)
    if type(value) is int:  # the common case, first: COCO files hold millions of ids
        return value
    where = f"{kind} {number} of {str(path)!r}"
    if key not in record:
        raise EvalInputError(f"{where} lacks the field `{key}`; COCO records carry integer ids.")
    try:
        return as_id(value, key)
    except EvalInputError as err:
        raise EvalInputError(f"{where}: {err}") from None


def _coco_index(document: dict[str, Any], purpose: str) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise EvalInputError(
            f"{purpose} needs pycocotools; install it with `pip install pycocotools` (or `pip install "
            "vlmfix[bench]`)."
        ) from err
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco
