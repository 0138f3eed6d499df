"""Synthetic scenes: which objects an image holds, how it is drawn, and its reference captions.

A scene is 1 to 4 distinct categories, each drawn once as its glyph at a random position and size on
a textured background. In training scenes each member of a `PAIRS` pair comes with its partner with
probability `pair_keep`; in validation scenes a controlled share of images holds exactly one "broken"
pair member (its partner absent) and every other pair is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .categories import CATEGORIES, CATEGORY_BY_NAME, COLOURS, PARTNER, Glyph

OBJECT_COUNT_WEIGHTS = (0.15, 0.3, 0.3, 0.25)  # P(1), P(2), P(3), P(4) objects
MIN_SIZE, MAX_SIZE = 22, 40  # glyph box side, pixels
MAX_OVERLAP = 0.2  # largest share of the smaller box that another box may cover
_NAMES = tuple(category.name for category in CATEGORIES)


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: its category and its COCO box `(x, y, width, height)` in pixels."""

    name: str
    box: tuple[int, int, int, int]
    area: int


@dataclass(frozen=True)
class Scene:
    """One image: the objects in caption order (pair members adjacent) and whether a pair is broken."""

    objects: tuple[PlacedObject, ...]
    broken: str | None  # the present member of a broken pair (validation), else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(obj.name for obj in self.objects)


def sample_train_names(rng: np.random.Generator, pair_keep: float) -> list[str]:
    """Categories of one training scene; a pair member brings its partner with probability `pair_keep`."""
    count = int(rng.choice(len(OBJECT_COUNT_WEIGHTS), p=OBJECT_COUNT_WEIGHTS)) + 1
    names: list[str] = []
    banned: set[str] = set()
    while len(names) < count:
        name = _NAMES[int(rng.integers(len(_NAMES)))]
        if name in names or name in banned:
            continue
        partner = PARTNER.get(name)
        if partner is None:
            names.append(name)
        elif rng.random() < pair_keep:
            if count - len(names) >= 2:
                names += [name, partner]
            # else: no room for the pair; draw again
        else:
            names.append(name)
            banned.add(partner)
    return names


def sample_val_names(rng: np.random.Generator, broken: bool) -> tuple[list[str], str | None]:
    """Categories of one validation scene: complete pairs, plus one lone pair member if `broken`."""
    count = int(rng.choice(len(OBJECT_COUNT_WEIGHTS), p=OBJECT_COUNT_WEIGHTS)) + 1
    names: list[str] = []
    lone = None
    if broken:
        members = sorted(PARTNER)
        lone = members[int(rng.integers(len(members)))]
        names.append(lone)
    while len(names) < count:
        name = _NAMES[int(rng.integers(len(_NAMES)))]
        if name in names or name == PARTNER.get(lone or ""):
            continue
        partner = PARTNER.get(name)
        if partner is None:
            names.append(name)
        elif count - len(names) >= 2 and partner not in names:
            names += [name, partner]
    return names, lone


def _shape_polygon(shape: str, x: float, y: float, size: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` in the box at (x, y) of side `size`; None for round shapes."""
    cx, cy, r = x + size / 2, y + size / 2, size / 2
    if shape == "square":
        inset = 0.1 * size
        return [(x + inset, y + inset), (x + size - inset, y + inset), (x + size - inset, y + size - inset),
                (x + inset, y + size - inset)]
    if shape == "triangle":
        return [(cx, y), (x + size, y + size), (x, y + size)]
    if shape == "diamond":
        return [(cx, y), (x + size, cy), (cx, y + size), (x, cy)]
    if shape == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + rad * np.sin(k * np.pi / 5), cy - rad * np.cos(k * np.pi / 5)) for k, rad in
                enumerate(radii)]
    if shape == "cross":
        a, b = 0.33 * size, 0.67 * size
        return [(x + a, y), (x + b, y), (x + b, y + a), (x + size, y + a), (x + size, y + b), (x + b, y + b),
                (x + b, y + size), (x + a, y + size), (x + a, y + b), (x, y + b), (x, y + a), (x + a, y + a)]
    return None


def _glyph_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask [size, size] of `shape` drawn in a size x size box."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(shape, 0, 0, size - 1)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    else:
        draw.ellipse((0, 0, size - 1, size - 1), fill=255)
        if shape == "ring":
            hole = 0.28 * size
            draw.ellipse((hole, hole, size - 1 - hole, size - 1 - hole), fill=0)
    return np.asarray(canvas) > 127


def _glyph_texture(glyph: Glyph, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB texture [size, size, 3] (float) of `glyph`'s colour and pattern, with a little jitter."""
    base = np.array(COLOURS[glyph.colour], dtype=np.float32) + rng.normal(0, 8, 3)
    # the pattern's second tone: darker for light colours, lighter for dark ones
    second = base * 0.45 if base.mean() > 60 else base + 110
    rows, cols = np.mgrid[0:size, 0:size]
    if glyph.pattern == "stripes":
        use_second = (rows // 3) % 2 == 1
    elif glyph.pattern == "dots":
        use_second = ((rows % 6) - 2.5) ** 2 + ((cols % 6) - 2.5) ** 2 < 3.5
    elif glyph.pattern == "checker":
        use_second = ((rows // 4) + (cols // 4)) % 2 == 1
    else:
        use_second = np.zeros((size, size), dtype=bool)
    return np.where(use_second[..., None], second, base)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted, textured RGB background [size, size, 3] (float)."""
    grey = rng.uniform(85, 165)
    base = grey + rng.uniform(-20, 20, 3)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = int(rng.integers(3))
    if kind == 0:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        texture = 25 * ((rows * np.cos(angle) + cols * np.sin(angle)) / size - 0.5)
    elif kind == 1:  # soft waves
        fx, fy = rng.uniform(0.05, 0.2, 2)
        texture = 12 * np.sin(fx * rows + rng.uniform(0, 6)) * np.cos(fy * cols + rng.uniform(0, 6))
    else:  # coarse noise, upsampled
        coarse = rng.normal(0, 10, (size // 8 + 1, size // 8 + 1))
        texture = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    noise = rng.normal(0, 5, (size, size, 3))
    return base + texture[..., None] + noise


def _overlap_ok(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        inter_w = max(0, min(x + w, ox + ow) - max(x, ox))
        inter_h = max(0, min(y + h, oy + oh) - max(y, oy))
        if inter_w * inter_h > MAX_OVERLAP * min(w * h, ow * oh):
            return False
    return True


def render_scene(
    names: list[str], broken: str | None, size: int, rng: np.random.Generator
) -> tuple[Image.Image, Scene, np.ndarray]:
    """Draw the glyphs of `names` on a textured background.

    Returns the RGB image, its `Scene` and its label map [size, size] uint8: 0 for background, else
    1 + the index in CATEGORIES of the visible (topmost) object.
    """
    canvas = _background(size, rng)
    label_map = np.zeros((size, size), dtype=np.uint8)
    placed: list[PlacedObject] = []
    for name in names:
        glyph = CATEGORY_BY_NAME[name].glyph
        for _attempt in range(50):
            side = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if _overlap_ok((x, y, side, side), [obj.box for obj in placed]):
                break
        mask = _glyph_mask(glyph.shape, side)  # [side, side]
        texture = _glyph_texture(glyph, side, rng)  # [side, side, 3]
        region = canvas[y : y + side, x : x + side]
        region[mask] = texture[mask]
        label_map[y : y + side, x : x + side][mask] = _NAMES.index(name) + 1
        ys, xs = np.nonzero(mask)
        box = (x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)
        placed.append(PlacedObject(name, box, int(mask.sum())))
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), Scene(tuple(placed), broken), label_map
