"""CHAIR ground truth: image id -> set of node words, from COCO annotations or a precomputed JSON map.

* `ground_truth_from_coco`: every instance annotation's category (mapped to its node word) plus every
  reference caption's mention list under the active normalizer and quirks, united per image. The standard
  COCO protocol passes the train2014 + val2014 instances *and* captions files (the reference needs both;
  caption words such as "table" or "people" widen what counts as present). Other COCO-format datasets
  (the toy scenes) may pass no captions. Images listed in the files without any annotation get an empty set.
* `ground_truth_from_json`: `{"<image_id>": ["node word", ...]}` (for example lmms-eval's `gt_object` lists).

Files are read as UTF-8 by vlmfix (another encoding raises, naming the file and byte) and checked before use:
an annotation whose `category_id` is not among the file's categories, a reference caption that is not a
string, a map entry that is not a list of node words or an image id given twice (`"1"` and `"01"`) raise.

The COCO build is cached as one JSON file (never a pickle) named by the hash of its header: format version,
sha256 of every input file, vocabulary sha256, normalizer + table + NLTK versions and quirk mode. Any change
of header means another file name, so a stale cache is never read; writes are atomic.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vlmfix.eval._io import (
    PathLike,
    atomic_write_text,
    canonical_json,
    int_keyed,
    load_coco,
    read_json,
    sha256_file,
    sha256_json,
    shown,
)
from vlmfix.eval.chair.mentions import MentionExtractor
from vlmfix.eval.chair.vocabulary import ChairVocabulary
from vlmfix.eval.errors import EvalInputError, MissingGroundTruthError

CACHE_FORMAT = "vlmfix.chair.ground_truth"
CACHE_FORMAT_VERSION = 1
ON_MISSING = ("error", "empty")


@dataclass(frozen=True)
class GroundTruth:
    """Image id -> the node words present in that image.

    Args:
        objects: image id -> frozenset of node words.
        header: where it came from (input hashes, vocabulary, normalizer, quirks).
        cache_key: first 16 hex digits of the sha256 of the canonical header (recorded in the fingerprint).
    """

    objects: Mapping[int, frozenset[str]]
    header: Mapping[str, Any]
    cache_key: str

    def for_image(self, image_id: int, on_missing: str = "error") -> frozenset[str]:
        """The objects of one image; an unknown id raises (`on_missing='error'`) or gives the empty set."""
        if image_id in self.objects:
            return self.objects[image_id]
        if on_missing == "empty":
            return frozenset()
        raise MissingGroundTruthError(
            f"image_id {image_id} has no CHAIR ground truth ({len(self.objects)} images known); check that "
            "the captions belong to the annotation files given, or set on_missing_gt='empty' to score "
            "every mention of that caption as a hallucination (what the reference does silently)."
        )


def cache_key(header: Mapping[str, Any]) -> str:
    return sha256_json(header)[:16]


def ground_truth_from_coco(
    instances: Sequence[PathLike],
    captions: Sequence[PathLike] = (),
    *,
    extractor: MentionExtractor,
    cache_dir: PathLike | None = None,
) -> GroundTruth:
    """Build (or load from `cache_dir`) the ground truth of COCO-format instance and caption files.

    Args:
        instances: instance annotation files (e.g. instances_train2014.json, instances_val2014.json).
        captions: caption annotation files (e.g. captions_train2014.json, captions_val2014.json); optional
            for datasets without captions.
        extractor: the active vocabulary + normalizer (`make_extractor(...)`).
        cache_dir: folder of the JSON cache; None builds without caching.

    Raises:
        EvalInputError: a file is missing, or a category name is not in the vocabulary.
    """
    if isinstance(instances, (str, Path)) or isinstance(captions, (str, Path)):
        raise EvalInputError(
            "`instances` and `captions` must be lists of paths, got a single path; write [path] instead."
        )
    if not instances:
        raise EvalInputError("`instances` is empty; pass at least one COCO instances file.")
    for path in (*instances, *captions):
        if not Path(path).is_file():
            raise EvalInputError(
                f"annotation file {str(path)!r} does not exist; pass the path of a COCO json file."
            )
    header = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "inputs": {
            "instances": [sha256_file(path) for path in instances],
            "captions": [sha256_file(path) for path in captions],
        },
        **extractor_header(extractor),
    }
    key = cache_key(header)
    cache_path = Path(cache_dir) / f"chair_gt_{key}.json" if cache_dir is not None else None
    if cache_path is not None:
        cached = _read_cache(cache_path, header)
        if cached is not None:
            return GroundTruth(cached, MappingProxyType(header), key)
    objects = _objects_from_coco(instances, captions, extractor)
    if cache_path is not None:
        body = {str(image_id): sorted(words) for image_id, words in sorted(objects.items())}
        atomic_write_text(cache_path, canonical_json({"header": header, "objects": body}) + "\n")
    frozen = {image_id: frozenset(words) for image_id, words in objects.items()}
    return GroundTruth(MappingProxyType(frozen), MappingProxyType(header), key)


def ground_truth_from_json(path: PathLike, *, vocabulary: ChairVocabulary) -> GroundTruth:
    """Read a precomputed `{"<image_id>": ["node word", ...]}` map; every word must be an active node word.

    Keys are digit strings; two keys naming one image (`"1"` twice, or `"1"` and `"01"`) raise, as does a
    value that is not a list of strings.
    """
    path = Path(path)
    raw = read_json(path, "ground-truth map", object_pairs_hook=_Pairs)
    if not isinstance(raw, _Pairs):
        raise EvalInputError(
            f'ground-truth map {str(path)!r} must be a JSON object {{"<image_id>": [node words]}}, '
            f"got {type(raw).__name__}."
        )
    objects = _objects_from_pairs(raw, path, set(vocabulary.node_words))
    header = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "inputs": {"json_map": [sha256_file(path)]},
        "vocabulary_sha256": vocabulary.sha256,
        "quirks": vocabulary.quirks,
    }
    return GroundTruth(MappingProxyType(objects), MappingProxyType(header), cache_key(header))


class _Pairs(list):
    """The (key, value) pairs of one JSON object, in file order (repeated keys kept, to be refused)."""


def _objects_from_pairs(pairs: _Pairs, path: Path, nodes: set[str]) -> dict[int, frozenset[str]]:
    objects: dict[int, frozenset[str]] = {}
    for image_id, words in int_keyed(pairs, "image_id", f"ground-truth map {str(path)!r}").items():
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise EvalInputError(
                f"ground-truth map {str(path)!r}: image {image_id} must be a list of node words, got "
                f'{shown(words)}; e.g. {{"42": ["dog", "dining table"]}}.'
            )
        unknown = sorted(set(words) - nodes)
        if unknown:
            raise EvalInputError(
                f"ground-truth map {str(path)!r}, image {image_id}: {unknown} are not node words of the active "
                "CHAIR vocabulary; use node words (e.g. 'dining table', not 'table') or add them through "
                "chair.vocabulary.extra."
            )
        objects[image_id] = frozenset(words)
    return objects


def extractor_header(extractor: MentionExtractor) -> dict[str, Any]:
    """What of an extractor decides a COCO-built ground truth: vocabulary hash, normalizer, NLTK, quirks."""
    normalizer = extractor.normalizer
    return {
        "vocabulary_sha256": extractor.vocabulary.sha256,
        "normalizer": normalizer.version,
        "nltk_version": normalizer.nltk_version,
        "quirks": extractor.vocabulary.quirks,
    }


def _read_cache(path: Path, header: Mapping[str, Any]) -> dict[int, frozenset[str]] | None:
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # ValueError covers bad UTF-8 and bad JSON
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("objects"), dict):
        warnings.warn(f"CHAIR ground-truth cache {str(path)!r} is unreadable; rebuilding it.", stacklevel=3)
        return None
    if document.get("header") != header:
        warnings.warn(
            f"CHAIR ground-truth cache {str(path)!r} has another header; rebuilding it.", stacklevel=3
        )
        return None
    return {int(key): frozenset(words) for key, words in document["objects"].items()}


def _load_coco(path: PathLike) -> Any:
    return load_coco(path, "COCO annotation", "CHAIR ground truth from COCO files")


def _objects_from_coco(
    instances: Sequence[PathLike], captions: Sequence[PathLike], extractor: MentionExtractor
) -> dict[int, set[str]]:
    vocabulary = extractor.vocabulary
    objects: dict[int, set[str]] = {}
    for path in instances:
        coco = _load_coco(path)
        node_of_category = {}
        for category in coco.loadCats(coco.getCatIds()):
            node = vocabulary.node_of(category["name"])
            if node is None:
                raise EvalInputError(
                    f"category {category['name']!r} (id {category['id']}) of {str(path)!r} is not in the "
                    "CHAIR vocabulary; add it as a node word with chair.vocabulary.extra, e.g. "
                    f"{{{category['name']!r}: [synonyms...]}}."
                )
            node_of_category[category["id"]] = node
        for image_id in coco.getImgIds():
            objects.setdefault(int(image_id), set())
        for annotation in coco.dataset.get("annotations", []):
            if "category_id" not in annotation:
                raise EvalInputError(
                    f"annotation {annotation['id']} of instances file {str(path)!r} has no category_id; pass "
                    "instance annotation files as `instances` and caption files as `captions`."
                )
            objects.setdefault(annotation["image_id"], set()).add(node_of_category[annotation["category_id"]])
    for path in captions:
        coco = _load_coco(path)
        for image_id in coco.getImgIds():
            objects.setdefault(int(image_id), set())
        for annotation in coco.dataset.get("annotations", []):
            caption = annotation.get("caption")
            if not isinstance(caption, str):
                raise EvalInputError(
                    f"caption annotation {annotation['id']} of {str(path)!r} must be a string, got "
                    f"{shown(caption)}; pass caption annotation files (captions_*.json) as `captions`."
                )
            objects.setdefault(annotation["image_id"], set()).update(extractor(caption).nodes)
    return objects
