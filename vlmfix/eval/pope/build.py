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

The annotation file is read as UTF-8 and checked first: an annotation whose image is not in the `images` list
(it could not be asked about: no file name), whose category is not listed, or (for `area` order) whose area is
not a finite number >= 0 raises, naming the file and the annotation.

Upstream's released COCO files cannot be regenerated (unseeded sampling); build once per dataset and treat the
files as fixed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix import validation
from vlmfix.eval._io import PathLike, atomic_write_text, jsonl_text, load_coco, sha256_file, shown
from vlmfix.eval.errors import EvalInputError, checked
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

    Every value is checked at construction (`vlmfix.validation`): counts and the seed are real ints (a seed
    "0" would seed `random` differently from 0), splits distinct names, the template fills exactly
    {article} and {object}. A list of splits is stored as a tuple.
    """

    splits: tuple[str, ...] = SPLITS
    n_images: int = 500
    min_objects: int = QUESTIONS_PER_SIDE
    seed: int = 0
    positive_order: str = "annotation"
    template: str = DEFAULT_TEMPLATE
    display_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        splits = checked(
            validation.sequence,
            self.splits,
            "splits",
            item=lambda value, name: validation.choice(value, name, SPLITS),
            min_length=1,
            unique=True,
            what="split names",
            meaning=f"Choose from {', '.join(SPLITS)}",
        )
        object.__setattr__(self, "splits", splits)
        checked(validation.number, self.n_images, "n_images", integer=True, low=1, meaning="images per split")
        checked(
            validation.number,
            self.min_objects,
            "min_objects",
            integer=True,
            low=QUESTIONS_PER_SIDE,
            meaning=f"the fewest objects an eligible image has ({QUESTIONS_PER_SIDE} positive questions each)",
        )
        checked(validation.number, self.seed, "seed", integer=True, meaning="the seed of sampling and order")
        checked(validation.choice, self.positive_order, "positive_order", options=POSITIVE_ORDERS)
        _check_template(self.template)
        object.__setattr__(self, "display_names", _checked_display_names(self.display_names))


def _check_template(template: Any) -> None:
    checked(validation.text, template, "template")
    try:
        probe = template.format(article="a", object="\0")
    except (KeyError, IndexError, ValueError):
        probe = ""
    if "\0" not in probe:
        raise EvalInputError(
            f"`template` must name its fields {{article}} and {{object}} (and no others), got {template!r}; "
            f"e.g. {DEFAULT_TEMPLATE!r}."
        )


def _checked_display_names(display_names: Any) -> dict[str, str]:
    if not isinstance(display_names, Mapping):
        raise EvalInputError(
            f"`display_names` must be a mapping object name -> question text, got {shown(display_names)}."
        )
    for name, text in display_names.items():
        checked(validation.text, text, f"display_names[{name!r}]", meaning="the text used for it in questions")
    return dict(display_names)


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
    checked(validation.choice, positive_order, "positive_order", options=POSITIVE_ORDERS)
    checked(validation.number, seed, "seed", integer=True)
    if (captions_path is None) != (extractor is None):
        raise EvalInputError(
            "`captions_path` and `extractor` go together: pass both to add caption objects, or neither."
        )
    coco = _load_coco(instances_path)
    file_names = _file_names(coco.dataset.get("images", []), instances_path)
    per_image = _annotated_objects(coco, file_names, instances_path, with_area=positive_order == "area")
    rng = random.Random(seed)
    objects: dict[int, tuple[str, ...]] = {}
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


def _annotated_objects(
    coco: Any, file_names: Mapping[int, str], path: PathLike, with_area: bool
) -> dict[int, dict[str, list[float]]]:
    """Image -> object name -> [first annotation id, summed area (0 unless `with_area`)], annotations by id."""
    names = {category["id"]: category["name"] for category in coco.loadCats(coco.getCatIds())}
    per_image: dict[int, dict[str, list[float]]] = {}
    for annotation in sorted(coco.dataset.get("annotations", []), key=lambda a: a["id"]):
        where = f"annotation {annotation['id']} of {str(path)!r}"
        if annotation["image_id"] not in file_names:
            raise EvalInputError(
                f"{where} is about image_id {annotation['image_id']}, which is not in the file's images list "
                "(so it has no file name to ask about); add the image or drop the annotation."
            )
        if "category_id" not in annotation:
            raise EvalInputError(f"{where} has no category_id; pass an instances file (instances_*.json).")
        entry = per_image.setdefault(annotation["image_id"], {})
        first_and_area = entry.setdefault(names[annotation["category_id"]], [annotation["id"], 0.0])
        if with_area:
            first_and_area[1] += _area(annotation, where)
    return per_image


def _file_names(images: Sequence[Mapping[str, Any]], path: PathLike) -> dict[int, str]:
    file_names = {}
    for image in images:
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise EvalInputError(
                f"image {image['id']} of {str(path)!r} needs a non-empty string `file_name` (questions name "
                f"the image file), got {shown(image.get('file_name'))}."
            )
        file_names[image["id"]] = image["file_name"]
    return file_names


def _area(annotation: Mapping[str, Any], where: str) -> float:
    try:
        return checked(validation.number, annotation.get("area", 0.0), "area", low=0)
    except EvalInputError as err:
        raise EvalInputError(f"{where}: {err} (positive_order='area' sums it per object)") from None


def _append_caption_objects(
    objects: Mapping[int, tuple[str, ...]], captions_path: PathLike, extractor: Any
) -> dict[int, tuple[str, ...]]:
    coco = _load_coco(captions_path)
    extended = {image_id: list(names) for image_id, names in objects.items()}
    for annotation in sorted(coco.dataset.get("annotations", []), key=lambda a: a["id"]):
        names = extended.get(annotation["image_id"])
        if names is None:  # a captioned image absent from the instances file: nothing to ask about
            continue
        caption = annotation.get("caption")
        if not isinstance(caption, str):
            raise EvalInputError(
                f"caption annotation {annotation['id']} of {str(captions_path)!r} must be a string, got "
                f"{shown(caption)}; pass a caption annotation file (captions_*.json) as captions_path."
            )
        for node in extractor(caption).nodes:
            if node not in names:
                names.append(node)
    return {image_id: tuple(names) for image_id, names in extended.items()}


def _load_coco(path: PathLike) -> Any:
    return load_coco(path, "COCO annotation", "building POPE from COCO annotations")
