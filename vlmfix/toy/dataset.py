"""Generate the toy scenes and write them as a COCO-format dataset.

Layout under `data_dir`:

```
images/train/toy_train_000000000001.png ...
images/val/toy_val_000000004001.png ...
annotations/instances_{train,val}.json   boxes, areas, categories (real COCO ids and names)
annotations/captions_{train,val}.json    CAPTIONS_PER_IMAGE captions per image
```

Image ids are unique across splits (val ids follow train ids), as in COCO. Every image draws from its
own generator seeded by (seed, split, index), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import reference_captions
from .categories import CATEGORIES, PAIRS
from .scenes import Scene, render_scene, sample_train_names, sample_val_names

SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ToyImage:
    """One generated image: ids, file, scene, reference captions, pixels [H, W, 3] uint8 and the label
    map [H, W] uint8 (0 background, else 1 + index in CATEGORIES of the visible object)."""

    image_id: int
    split: str
    file_name: str
    scene: Scene
    captions: tuple[str, ...]
    pixels: np.ndarray
    label_map: np.ndarray


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def generate_split(
    split: str, count: int, first_id: int, *, seed: int, image_size: int, pair_keep: float,
    broken_share: float, on_image: Callable[[], None] | None = None,
) -> list[ToyImage]:
    """`count` scenes of `split`; in val exactly round(count * broken_share) images hold a broken pair."""
    if split == "val":
        flags = np.zeros(count, dtype=bool)
        flags[: round(count * broken_share)] = True
        flags = np.random.default_rng([seed, _SPLIT_CODE[split]]).permutation(flags)
    images = []
    for index in range(count):
        rng = image_rng(seed, split, index)
        if split == "train":
            names, lone = sample_train_names(rng, pair_keep), None
        else:
            names, lone = sample_val_names(rng, broken=bool(flags[index]))
        picture, scene, label_map = render_scene(names, lone, image_size, rng)
        image_id = first_id + index
        images.append(ToyImage(
            image_id=image_id,
            split=split,
            file_name=f"toy_{split}_{image_id:012d}.png",
            scene=scene,
            captions=tuple(reference_captions(list(names), rng)),
            pixels=np.asarray(picture),
            label_map=label_map,
        ))
        if on_image is not None:
            on_image()
    return images


def _coco_header(split: str) -> dict:
    return {
        "info": {"description": f"vlmfix toy scenes, {split} split", "version": "1.0"},
        "licenses": [],
    }


def coco_instances(split: str, images: list[ToyImage]) -> dict:
    """The COCO instances dict of `images` (one annotation per object, box polygon as segmentation)."""
    category_id = {c.name: c.id for c in CATEGORIES}
    annotations: list[dict] = []
    for image in images:
        for obj in image.scene.objects:
            x, y, w, h = obj.box
            annotations.append({
                "id": len(annotations) + 1 + (0 if split == "train" else 10_000_000),
                "image_id": image.image_id,
                "category_id": category_id[obj.name],
                "bbox": [float(x), float(y), float(w), float(h)],
                "area": float(obj.area),
                "segmentation": [[float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]],
                "iscrowd": 0,
            })
    return {
        **_coco_header(split),
        "images": [_image_entry(image) for image in images],
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES],
    }


def coco_captions(split: str, images: list[ToyImage]) -> dict:
    """The COCO captions dict of `images`."""
    annotations = [
        {"id": 0, "image_id": image.image_id, "caption": caption}
        for image in images for caption in image.captions
    ]
    for index, annotation in enumerate(annotations):
        annotation["id"] = index + 1 + (0 if split == "train" else 10_000_000)
    return {**_coco_header(split), "images": [_image_entry(image) for image in images], "annotations": annotations}


def _image_entry(image: ToyImage) -> dict:
    height, width = image.pixels.shape[:2]
    return {"id": image.image_id, "file_name": image.file_name, "width": width, "height": height}


def write_split(data_dir: Path, split: str, images: list[ToyImage]) -> None:
    """Write the PNG files and both annotation files of one split under `data_dir`."""
    from PIL import Image

    image_dir = data_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        Image.fromarray(image.pixels).save(image_dir / image.file_name, format="PNG")
    annotation_dir = data_dir / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    write_json(annotation_dir / f"instances_{split}.json", coco_instances(split, images))
    write_json(annotation_dir / f"captions_{split}.json", coco_captions(split, images))


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")


def pair_cooccurrence(images: list[ToyImage]) -> dict[str, float]:
    """Per pair "a+b": share of the images holding a or b that hold both."""
    rates = {}
    for a, b in PAIRS:
        either = [image for image in images if a in image.scene.names or b in image.scene.names]
        both = sum(a in image.scene.names and b in image.scene.names for image in either)
        rates[f"{a}+{b}"] = both / len(either) if either else 1.0
    return rates
