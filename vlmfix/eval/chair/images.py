"""Deterministic CHAIR image selection and the image-list hash (spec A7).

Never derive the list from a directory listing (its order differs between machines). Three ways in:

* `sample_images(pool, n=500, seed=0)`: the pool sorted ascending, then `random.Random(seed).sample`, kept in
  sampled order; the standard pool is the `images` ids of instances_val2014.json (`image_ids_from_coco`).
* `images_from_list(ids)` / `read_image_list(path)`: explicit ids, used as given; duplicates are an error.
* `images_from_caption_log(path, preset=...)`: the ids of a released caption log in file order, e.g. OPERA's
  `log/chair_eval_results/llava-1.5/greedy.jsonl` for the preset `opera_llava15_500`, checked against the
  preset's published hash.
* `read_pinned_list(name_or_path)`: a pinned list shipped with vlmfix (`vlmfix/eval/data/repro/chair_<name>.json`,
  e.g. `opera_llava15_500`, the reproduction packs' image list) or a file of the same format: the ids, where they
  come from and how they were derived, and their image-list hash, checked when read.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vlmfix import validation
from vlmfix.eval._io import PathLike, as_id, parse_json, read_json, read_records, read_text, sha256_text
from vlmfix.eval.errors import EvalInputError, checked

# Image-list hashes of named presets (sha256 of the ids sorted ascending, decimal, joined by ",").
PRESET_HASHES = {"opera_llava15_500": "b438763b64aa385e3cee7f76c8b6fc74256aa9044c4224e9463b16551c4ef3b4"}
PINNED_DIR = "repro"  # under vlmfix/eval/data: the shipped pinned lists, chair_<name>.json
PINNED_KEYS = ("name", "source", "derivation", "image_list_hash", "image_ids")


def image_list_hash(image_ids: Iterable[int]) -> str:
    """sha256 of the ids sorted ascending, written in decimal and joined by "," (order-independent).

    >>> image_list_hash([3, 1, 2]) == image_list_hash([1, 2, 3])
    True
    """
    return sha256_text(",".join(str(i) for i in sorted(image_ids)))


@dataclass(frozen=True)
class ImageSelection:
    """The images a CHAIR run captions, in generation order, and how they were chosen.

    Args:
        image_ids: ids in the order to caption them.
        mode: `sample`, `list` or `preset`.
        seed: the sampling seed (`sample` only).
        source: the pool size, list file or preset name, as text.
        hash: `image_list_hash(image_ids)`.
    """

    image_ids: tuple[int, ...]
    mode: str
    seed: int | None
    source: str
    hash: str

    def describe(self) -> dict:
        """The fingerprint fields of this selection."""
        return {
            "mode": self.mode,
            "n": len(self.image_ids),
            "seed": self.seed,
            "source": self.source,
            "image_list_hash": self.hash,
        }


def image_ids_from_coco(instances_path: PathLike) -> list[int]:
    """The `id`s of the `images` list of a COCO-format annotation file (UTF-8), sorted ascending."""
    path = Path(instances_path)
    document = read_json(path, "instances")
    images = document.get("images") if isinstance(document, dict) else None
    if not images or not isinstance(images, list) or not all(isinstance(image, dict) for image in images):
        raise EvalInputError(
            f"instances file {str(path)!r} has no `images` list of objects; is it a COCO annotation file?"
        )
    return sorted(_as_id(image.get("id"), str(path)) for image in images)


def sample_images(pool: Iterable[int], n: int = 500, seed: int = 0) -> ImageSelection:
    """`random.Random(seed).sample(sorted(pool), n)`, kept in sampled order.

    `n` and `seed` must be ints: `random.Random` would also take "0" or 1.5 and silently draw another sample.
    """
    ordered = sorted(_unique(pool, "pool"))
    n = checked(
        validation.number,
        n,
        "n",
        integer=True,
        low=1,
        high=len(ordered),
        meaning=f"Lower chair.images.n or use a larger pool (the pool has {len(ordered)} ids)",
    )
    seed = checked(validation.number, seed, "seed", integer=True, meaning="the sampling seed (chair.images.seed)")
    chosen = random.Random(seed).sample(ordered, n)
    return ImageSelection(
        tuple(chosen), "sample", seed, f"pool of {len(ordered)} ids", image_list_hash(chosen)
    )


def images_from_list(image_ids: Sequence[int], source: str = "explicit list") -> ImageSelection:
    """Explicit ids, used in the order given; duplicates raise."""
    ids = _unique(image_ids, source)
    if not ids:
        raise EvalInputError(f"image list {source!r} is empty; give at least one image id.")
    return ImageSelection(tuple(ids), "list", None, source, image_list_hash(ids))


def read_image_list(path: PathLike) -> ImageSelection:
    """Ids from a JSON list or a file with one id per line."""
    path = Path(path)
    text = read_text(path, "image list")
    raw = parse_json(text, path, "image list") if text.lstrip().startswith("[") else text.split()
    return images_from_list([_as_id(value, str(path)) for value in raw], str(path))


def images_from_caption_log(
    path: PathLike, preset: str | None = None, image_id_key: str = "image_id"
) -> ImageSelection:
    """The ids of a caption log (JSON Lines or array of `{"image_id": ..., ...}`) in file order.

    With `preset`, the ids must hash to that preset's published image-list hash (`PRESET_HASHES`).
    """
    rows = read_records(path, "caption log")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or image_id_key not in row:
            raise EvalInputError(
                f"caption log {str(path)!r}, record {number}, needs the key {image_id_key!r}; set image_id_key "
                "to the key your file uses."
            )
    ids = [_as_id(row[image_id_key], str(path)) for row in rows]
    if preset is None:
        return images_from_list(ids, str(path))
    if preset not in PRESET_HASHES:
        raise EvalInputError(
            f"Unknown image preset {preset!r}. Available: {', '.join(sorted(PRESET_HASHES))}"
        )
    selection = images_from_list(ids, preset)
    if selection.hash != PRESET_HASHES[preset]:
        raise EvalInputError(
            f"caption log {str(path)!r} has image-list hash {selection.hash}, not the {preset!r} hash "
            f"{PRESET_HASHES[preset]}; pass the released log the preset is defined by, unmodified."
        )
    return ImageSelection(selection.image_ids, "preset", None, preset, selection.hash)


def _pinned_folder() -> Traversable:
    return resources.files("vlmfix.eval").joinpath("data").joinpath(PINNED_DIR)


def pinned_list_names() -> list[str]:
    """The names of the pinned image lists shipped with vlmfix."""
    return sorted(entry.name.removeprefix("chair_").removesuffix(".json") for entry in _pinned_folder().iterdir()
                  if entry.name.startswith("chair_") and entry.name.endswith(".json"))


def pinned_list_path(name_or_path: PathLike) -> Path:
    """The file of a shipped pinned list (by name) or the path given, which must exist."""
    value = str(name_or_path)
    names = pinned_list_names()
    if value in names:
        return Path(str(_pinned_folder().joinpath(f"chair_{value}.json")))
    path = Path(value).expanduser()
    if not path.is_file():
        raise EvalInputError(
            f"pinned image list {value!r} is neither a list shipped with vlmfix ({', '.join(names)}) nor an "
            "existing file; name a shipped list or pass the path of a pinned-list JSON file."
        )
    return path


def read_pinned_list(name_or_path: PathLike) -> ImageSelection:
    """A pinned image list: a JSON object with `name`, `source`, `derivation`, `image_list_hash` and
    `image_ids` (in generation order). The ids must hash to the file's `image_list_hash` (and, for a named
    preset, to `PRESET_HASHES`): an edited list is refused instead of silently changing the images."""
    path = pinned_list_path(name_or_path)
    document = read_json(path, "pinned image list")
    missing = [key for key in PINNED_KEYS if not isinstance(document, dict) or key not in document]
    if missing:
        raise EvalInputError(
            f"pinned image list {str(path)!r} lacks {', '.join(missing)}; a pinned list is a JSON object with "
            f"{', '.join(PINNED_KEYS)}."
        )
    if not isinstance(document["image_ids"], list):
        raise EvalInputError(f"pinned image list {str(path)!r}: `image_ids` must be a JSON list of image ids.")
    name = str(document["name"])
    selection = images_from_list([_as_id(value, str(path)) for value in document["image_ids"]], str(path))
    for expected, what in ((document["image_list_hash"], "its own `image_list_hash`"),
                           (PRESET_HASHES.get(name, selection.hash), f"the published hash of {name!r}")):
        if selection.hash != expected:
            raise EvalInputError(
                f"pinned image list {str(path)!r}: its {len(selection.image_ids)} ids hash to {selection.hash}, "
                f"not {what} {expected}; the list was edited. Restore the file, or write your own list and use "
                "benchmark.images.mode=list."
            )
    return ImageSelection(selection.image_ids, "pinned", None, name, selection.hash)


def _as_id(value: object, source: str) -> int:
    try:
        return as_id(value, "image_id")
    except EvalInputError as err:
        raise EvalInputError(f"image list {source!r}: {err}") from None


def _unique(image_ids: Iterable[int], source: str) -> list[int]:
    ids = [_as_id(value, source) for value in image_ids]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise EvalInputError(
            f"image ids {duplicates[:10]} appear more than once in {source!r}; list each image once."
        )
    return ids
