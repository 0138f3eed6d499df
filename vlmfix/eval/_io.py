"""Small I/O helpers of `vlmfix.eval`: content hashes, canonical JSON, atomic writes, JSON / JSON Lines."""

from __future__ import annotations

import hashlib
import json
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


def read_records(path: PathLike, what: str) -> list[Any]:
    """Read a JSON array or JSON Lines file, sniffing the content (not the extension).

    The first non-blank character `[` means one JSON array; anything else means one JSON value per
    non-blank line. `what` names the file in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} file {str(path)!r} does not exist; pass the path of an existing file.")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalInputError(
                f"{what} file {str(path)!r} starts with '[' but is not valid JSON: {err}."
            ) from err
        return list(records)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise EvalInputError(
                f"{what} file {str(path)!r}, line {number}, is not valid JSON ({err}); the file must be a "
                "JSON array or JSON Lines (one object per line)."
            ) from err
    return records
