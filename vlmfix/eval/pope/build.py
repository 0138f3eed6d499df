"""Build POPE question sets (random / popular / adversarial) from any COCO-format annotations (spec B3).

Deterministic version of the POPE recipe (Li et al., EMNLP 2023, sec. 4). Two layers:

(a) `object_lists_from_coco`: per image, the distinct category names of its annotations (crowd included), in
    `positive_order` `annotation` (first occurrence by ascending annotation id), `area` (descending summed
    area) or `shuffled` (seeded); optionally followed by the CHAIR mention lists of the reference captions.
(b) `build_split`: eligible images (>= `min_objects` objects, sorted by id) are sampled with
    `random.Random(seed)`; per image, for i = 0, 1, 2: the positive `objects[i]`, then one negative not in the
    image and not yet asked for it: `random` = uniform over the pool of objects seen in the selected images
    (rejection sampling); `popular` = first eligible by image frequency; `adversarial` = first eligible in the
    co-occurrence list of *this* positive. Rankings break ties alphabetically; popular / adversarial fall back
    to random when exhausted. Each split draws from its own `random.Random(seed)`.

Upstream's released COCO files cannot be regenerated (unseeded sampling); build once per dataset and treat the
files as fixed.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.eval._io import PathLike, atomic_write_text, jsonl_text, sha256_file
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.pope.questions import SPLITS, PopeQuestion

POSITIVE_ORDERS = ("annotation", "area", "shuffled")
DEFAULT_TEMPLATE = "Is there {article} {object} in the image?"
QUESTIONS_PER_SIDE = 3


@dataclass(frozen=True)
class ObjectLists:
    """Per image: its objects in question order, and its file name."""

    objects: Mapping[int, tuple[str, ...]]
    file_names: Mapping[int, str]


@dataclass(frozen=True)
class PopeBuildConfig:
    """The knobs of a POPE build (all recorded in meta.json).

    Args:
        splits: which of random / popular / adversarial to build.
        n_images: images per split (500 in the released COCO files).
        min_objects: images with fewer objects are not eligible (3: three positives per image).
        seed: seeds image sampling, `shuffled` positive order and each split's negative sampling.
        positive_order: `annotation`, `area` or `shuffled`.
        template: question text with `{article}` ("a" / "an") and `{object}`.
        display_names: object name -> the text used in questions (names are verbatim by default, "a skis").
    """

    splits: tuple[str, ...] = SPLITS
    n_images: int = 500
    min_objects: int = QUESTIONS_PER_SIDE
    seed: int = 0
    positive_order: str = "annotation"
    template: str = DEFAULT_TEMPLATE
    display_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise EvalInputError(
                f"`splits` must be a non-empty subset of {', '.join(SPLITS)}, got {self.splits!r}."
            )
        if not isinstance(self.n_images, int) or self.n_images < 1:
            raise EvalInputError(f"`n_images` must be a positive int, got {self.n_images!r}.")
        if not isinstance(self.min_objects, int) or self.min_objects < QUESTIONS_PER_SIDE:
            raise EvalInputError(
                f"`min_objects` must be an int >= {QUESTIONS_PER_SIDE} (each image gets "
                f"{QUESTIONS_PER_SIDE} positive questions), got {self.min_objects!r}."
            )
        if self.positive_order not in POSITIVE_ORDERS:
            raise EvalInputError(
                f"`positive_order` must be one of {', '.join(POSITIVE_ORDERS)}, got {self.positive_order!r}."
            )
        if "{object}" not in self.template or "{}" in self.template:
            raise EvalInputError(
                f"`template` must name its fields {{article}} and {{object}}, got {self.template!r}; e.g. "
                f"{DEFAULT_TEMPLATE!r}."
            )


def object_lists_from_coco(
    instances_path: PathLike,
    positive_order: str = "annotation",
    seed: int = 0,
    captions_path: PathLike | None = None,
    extractor: Any = None,
) -> ObjectLists:
    """Per-image object lists of a COCO-format instances file (layer a).

    Args:
        instances_path: COCO-format instances json.
        positive_order: `annotation` | `area` | `shuffled` (seeded by `seed`, images in ascending id order).
        captions_path: with `extractor`, append the CHAIR mentions of each image's reference captions,
            in order of first mention (upstream's "from segmentations and captions"; COCO with captions only).
        extractor: a `vlmfix.eval.chair.MentionExtractor`.
    """
    if positive_order not in POSITIVE_ORDERS:
        raise EvalInputError(
            f"`positive_order` must be one of {', '.join(POSITIVE_ORDERS)}, got {positive_order!r}."
        )
    if (captions_path is None) != (extractor is None):
        raise EvalInputError(
            "`captions_path` and `extractor` go together: pass both to add caption objects, or neither."
        )
    coco = _load_coco(instances_path)
    names = {category["id"]: category["name"] for category in coco.loadCats(coco.getCatIds())}
    per_image: dict[int, dict[str, list[float]]] = {}  # image -> name -> [first annotation id, summed area]
    for annotation in sorted(coco.dataset.get("annotations", []), key=lambda a: a["id"]):
        entry = per_image.setdefault(int(annotation["image_id"]), {})
        name = names[annotation["category_id"]]
        first_and_area = entry.setdefault(name, [annotation["id"], 0.0])
        first_and_area[1] += float(annotation.get("area", 0.0))
    rng = random.Random(seed)
    objects: dict[int, tuple[str, ...]] = {}
    file_names = {int(image["id"]): image["file_name"] for image in coco.dataset.get("images", [])}
    for image_id in sorted(file_names):
        entry = per_image.get(image_id, {})
        if positive_order == "area":
            ordered = sorted(entry, key=lambda name: (-entry[name][1], entry[name][0]))
        else:
            ordered = sorted(entry, key=lambda name: entry[name][0])
            if positive_order == "shuffled":
                rng.shuffle(ordered)
        objects[image_id] = tuple(ordered)
    if captions_path is not None:
        objects = _append_caption_objects(objects, captions_path, extractor)
    return ObjectLists(objects, file_names)


def select_images(
    object_lists: Mapping[int, Sequence[str]], n_images: int, min_objects: int, seed: int
) -> list[int]:
    """Eligible images (>= min_objects objects) sorted by id, then `Random(seed).sample(eligible, n)`."""
    eligible = sorted(image_id for image_id, objects in object_lists.items() if len(objects) >= min_objects)
    if len(eligible) < n_images:
        raise EvalInputError(
            f"only {len(eligible)} images have >= {min_objects} objects, but n_images={n_images} were asked "
            "for; lower pope.n_images or min_objects."
        )
    return random.Random(seed).sample(eligible, n_images)


def object_statistics(
    object_lists: Mapping[int, Sequence[str]], image_ids: Sequence[int]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Over the selected images: `freq[o]` = images containing o; `cooc[o][p]` = images containing both."""
    freq: Counter[str] = Counter()
    cooc: dict[str, Counter[str]] = {}
    for image_id in image_ids:
        present = set(object_lists[image_id])
        freq.update(present)
        for obj in present:
            cooc.setdefault(obj, Counter()).update(present - {obj})
    return dict(sorted(freq.items())), {o: dict(sorted(c.items())) for o, c in sorted(cooc.items())}


def ranked(counts: Mapping[str, int]) -> list[str]:
    """Names by count descending, ties alphabetical."""
    return sorted(counts, key=lambda name: (-counts[name], name))


def build_split(
    object_lists: ObjectLists, split: str, image_ids: Sequence[int], config: PopeBuildConfig
) -> list[PopeQuestion]:
    """The questions of one split over the selected images: (pos1, neg1, pos2, neg2, pos3, neg3) per image."""
    if split not in SPLITS:
        raise EvalInputError(f"`split` must be one of {', '.join(SPLITS)}, got {split!r}.")
    freq, cooc = object_statistics(object_lists.objects, image_ids)
    pool = sorted(freq)
    for image_id in image_ids:
        left = len(set(pool) - set(object_lists.objects[image_id]))
        if left < QUESTIONS_PER_SIDE:
            raise EvalInputError(
                f"image {image_id} has {len(object_lists.objects[image_id])} of the {len(pool)} objects "
                f"seen in the selected images, leaving {left} < {QUESTIONS_PER_SIDE} candidates for "
                "negative questions; use a dataset with more categories or lower n_images so fewer images "
                "crowd the pool."
            )
    popular = ranked(freq)
    rng = random.Random(config.seed)
    questions: list[PopeQuestion] = []
    for image_id in image_ids:
        objects = object_lists.objects[image_id]
        present = set(objects)
        asked: set[str] = set()
        for positive in objects[:QUESTIONS_PER_SIDE]:
            if split == "popular":
                ranking = popular
            elif split == "adversarial":
                ranking = ranked(cooc.get(positive, {}))
            else:
                ranking = []
            negative = next((o for o in ranking if o not in present and o not in asked), None)
            while negative is None:
                candidate = rng.choice(pool)
                if candidate not in present and candidate not in asked:
                    negative = candidate
            asked.add(negative)
            for obj, label in ((positive, "yes"), (negative, "no")):
                questions.append(
                    PopeQuestion(
                        question_id=len(questions) + 1,
                        image=object_lists.file_names[image_id],
                        text=question_text(obj, config.template, config.display_names),
                        label=label,
                        image_id=image_id,
                        object=obj,
                    )
                )
    return questions


def question_text(
    obj: str, template: str = DEFAULT_TEMPLATE, display_names: Mapping[str, str] | None = None
) -> str:
    """Fill the template; only the article changes with the name ("an" before a, e, i, o, u).

    >>> question_text("apple"), question_text("skis")
    ('Is there an apple in the image?', 'Is there a skis in the image?')
    """
    name = (display_names or {}).get(obj, obj)
    return template.format(article="an" if name[:1].lower() in "aeiou" else "a", object=name)


@dataclass(frozen=True)
class PopeBuild:
    """What `build_pope` wrote: split -> question file path, and the meta.json content."""

    files: Mapping[str, Path]
    meta: Mapping[str, Any]


def build_pope(
    instances_path: PathLike,
    out_dir: PathLike,
    name: str = "coco",
    config: PopeBuildConfig | None = None,
    captions_path: PathLike | None = None,
    extractor: Any = None,
    compat_names: bool = False,
) -> PopeBuild:
    """Build question files `{name}_pope_{split}.jsonl` and `meta.json` in `out_dir`.

    Args:
        instances_path: COCO-format instances json.
        out_dir: output folder (created).
        name: dataset name used in file names.
        config: `PopeBuildConfig` (defaults: 500 images, seed 0, all three splits).
        captions_path, extractor: add the reference captions' CHAIR objects to each list (see
            `object_lists_from_coco`).
        compat_names: write upstream's `{name}_pope_{split}.json` names (content stays JSON Lines).

    The same inputs and config give byte-identical files.
    """
    config = config or PopeBuildConfig()
    lists = object_lists_from_coco(
        instances_path, config.positive_order, config.seed, captions_path, extractor
    )
    image_ids = select_images(lists.objects, config.n_images, config.min_objects, config.seed)
    freq, cooc = object_statistics(lists.objects, image_ids)
    out = Path(out_dir)
    files: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    for split in config.splits:
        questions = build_split(lists, split, image_ids, config)  # validates the pool before writing anything
        suffix = "json" if compat_names else "jsonl"
        files[split] = atomic_write_text(
            out / f"{name}_pope_{split}.{suffix}", jsonl_text(q.to_json() for q in questions)
        )
        counts[split] = {
            "questions": len(questions),
            "yes": sum(q.label == "yes" for q in questions),
            "no": sum(q.label == "no" for q in questions),
        }
    meta = {
        "format": "vlmfix.pope.build",
        "format_version": 1,
        "name": name,
        "config": {
            "splits": list(config.splits),
            "n_images": config.n_images,
            "min_objects": config.min_objects,
            "seed": config.seed,
            "positive_order": config.positive_order,
            "template": config.template,
            "display_names": dict(config.display_names),
            "include_caption_objects": captions_path is not None,
        },
        "inputs": {
            "instances_sha256": sha256_file(instances_path),
            "captions_sha256": sha256_file(captions_path) if captions_path is not None else None,
        },
        "counts": counts,
        "files": {split: {"name": path.name, "sha256": sha256_file(path)} for split, path in files.items()},
        "image_ids": image_ids,
        "freq": freq,
        "cooc": cooc,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return PopeBuild(files, meta)


def _append_caption_objects(
    objects: Mapping[int, tuple[str, ...]], captions_path: PathLike, extractor: Any
) -> dict[int, tuple[str, ...]]:
    coco = _load_coco(captions_path)
    extended = {image_id: list(names) for image_id, names in objects.items()}
    for annotation in sorted(coco.dataset.get("annotations", []), key=lambda a: a["id"]):
        names = extended.get(int(annotation["image_id"]))
        if names is None:  # a captioned image absent from the instances file: nothing to ask about
            continue
        for node in extractor(annotation["caption"]).nodes:
            if node not in names:
                names.append(node)
    return {image_id: tuple(names) for image_id, names in extended.items()}


def _load_coco(path: PathLike) -> Any:
    if not Path(path).is_file():
        raise EvalInputError(f"annotation file {str(path)!r} does not exist; pass a COCO-format json file.")
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise EvalInputError(
            "building POPE from COCO annotations needs pycocotools; install it with `pip install "
            "pycocotools` (or `pip install vlmfix[bench]`)."
        ) from err
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))
