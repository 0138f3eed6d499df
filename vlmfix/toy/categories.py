"""The toy's object vocabulary: 24 real COCO categories, their glyphs, co-occurring pairs and synonyms.

Each category keeps its real COCO name and id, so CHAIR and POPE read the toy data like COCO. The
synonyms are a subset of the CHAIR synonym lines (Rohrbach et al., 2018) for that category: every
word the toy's captions may use for an object is one CHAIR maps back to the same node word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
PATTERNS = ("solid", "stripes", "dots", "checker")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 200),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


@dataclass(frozen=True)
class Glyph:
    """How a category is drawn: a shape filled with a colour and a pattern."""

    shape: str
    colour: str
    pattern: str


@dataclass(frozen=True)
class Category:
    """One COCO category of the toy: real COCO id and name, caption synonyms, glyph."""

    id: int
    name: str
    supercategory: str
    synonyms: tuple[str, ...]
    glyph: Glyph


_SUPERCATEGORY = {
    "person": "person", "bicycle": "vehicle", "car": "vehicle", "boat": "vehicle", "traffic light": "outdoor",
    "bird": "animal", "cat": "animal", "dog": "animal", "horse": "animal", "umbrella": "accessory",
    "frisbee": "sports", "sports ball": "sports", "surfboard": "sports", "tennis racket": "sports",
    "bottle": "kitchen", "fork": "kitchen", "knife": "kitchen", "banana": "food", "pizza": "food",
    "chair": "furniture", "laptop": "electronic", "mouse": "electronic", "book": "indoor", "clock": "indoor",
}


def _category(coco_id: int, name: str, synonyms: tuple[str, ...], shape: str, colour: str, pattern: str):
    return Category(coco_id, name, _SUPERCATEGORY[name], synonyms, Glyph(shape, colour, pattern))


# Each shape and each colour is used by three categories; colour and pattern together (a local
# texture, visible in any patch of the glyph) identify a category, and the shape confirms it.
CATEGORIES: tuple[Category, ...] = (
    _category(1, "person", ("man", "woman", "boy", "girl"), "star", "red", "solid"),
    _category(2, "bicycle", ("bike",), "ring", "blue", "solid"),
    _category(3, "car", ("van", "taxi"), "square", "blue", "stripes"),
    _category(9, "boat", ("ship", "sailboat"), "triangle", "cyan", "solid"),
    _category(10, "traffic light", ("stoplight", "streetlight"), "circle", "green", "dots"),
    _category(16, "bird", ("duck", "owl"), "cross", "yellow", "solid"),
    _category(17, "cat", ("kitten",), "triangle", "magenta", "stripes"),
    _category(18, "dog", ("puppy", "pup"), "circle", "yellow", "dots"),
    _category(19, "horse", ("pony",), "hexagon", "black", "solid"),
    _category(28, "umbrella", (), "diamond", "red", "stripes"),
    _category(34, "frisbee", (), "ring", "magenta", "dots"),
    _category(37, "sports ball", ("ball",), "circle", "white", "checker"),
    _category(42, "surfboard", ("longboard",), "diamond", "cyan", "stripes"),
    _category(43, "tennis racket", ("racket",), "cross", "green", "stripes"),
    _category(44, "bottle", (), "hexagon", "green", "checker"),
    _category(48, "fork", (), "star", "white", "stripes"),
    _category(49, "knife", (), "triangle", "black", "stripes"),
    _category(52, "banana", (), "star", "yellow", "checker"),
    _category(59, "pizza", (), "hexagon", "red", "dots"),
    _category(62, "chair", ("seat", "stool"), "square", "magenta", "solid"),
    _category(73, "laptop", ("computer", "notebook"), "square", "black", "checker"),
    _category(74, "mouse", (), "ring", "white", "solid"),
    _category(84, "book", (), "cross", "cyan", "checker"),
    _category(85, "clock", (), "diamond", "blue", "dots"),
)

# The fixed co-occurring pairs: in training images, each member almost always comes with its partner.
PAIRS: tuple[tuple[str, str], ...] = (
    ("dog", "frisbee"),
    ("fork", "knife"),
    ("person", "surfboard"),
    ("car", "traffic light"),
    ("tennis racket", "sports ball"),
    ("laptop", "mouse"),
)

CATEGORY_BY_NAME: dict[str, Category] = {category.name: category for category in CATEGORIES}
PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

# surface word (one or two words) -> category name
_SURFACE_TO_NAME: dict[str, str] = {
    word: category.name for category in CATEGORIES for word in (category.name, *category.synonyms)
}
_TWO_WORD_SURFACES = {surface for surface in _SURFACE_TO_NAME if " " in surface}


def _check_vocabulary() -> None:
    shapes = [c.glyph.shape for c in CATEGORIES]
    colours = [c.glyph.colour for c in CATEGORIES]
    assert len({(c.glyph.shape, c.glyph.colour) for c in CATEGORIES}) == len(CATEGORIES)
    assert len({(c.glyph.colour, c.glyph.pattern) for c in CATEGORIES}) == len(CATEGORIES)
    assert all(shapes.count(s) == 3 for s in SHAPES) and all(colours.count(c) == 3 for c in COLOURS)
    assert all(a in CATEGORY_BY_NAME and b in CATEGORY_BY_NAME for a, b in PAIRS)
    assert len(PARTNER) == 2 * len(PAIRS)


_check_vocabulary()


def find_mentions(caption: str) -> list[str]:
    """Category names mentioned in `caption`, in order, with repeats (names, synonyms, plural -s).

    Two-word names merge greedily left to right, as CHAIR's double-word pass does.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    mentions: list[str] = []
    i = 0
    while i < len(words):
        bigram = " ".join(words[i : i + 2])
        if bigram in _TWO_WORD_SURFACES:
            mentions.append(_SURFACE_TO_NAME[bigram])
            i += 2
            continue
        word = words[i]
        singular = word[:-1] if word.endswith("s") and word[:-1] in _SURFACE_TO_NAME else word
        if singular in _SURFACE_TO_NAME:
            mentions.append(_SURFACE_TO_NAME[singular])
        i += 1
    return mentions
