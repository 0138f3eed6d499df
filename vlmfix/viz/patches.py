"""Where each image token of a prompt row lies in its image: the families' patch grids.

A row's image tokens are numbered 0 .. n-1 in prompt order (the numbering the methods' reports use for
"image-token indices"). A `RowLayout` lays them on grids that each cover one whole image:

- LLaVA-1.5: one (image_size / patch_size)^2 grid per image (24 x 24 for 336 / 14), row-major, over the image's
  central square (the processor resizes the short side and crops the centre);
- LLaVA-NeXT: per image, the base view (the same square grid, first), then the AnyRes tiles joined into one
  grid and cut back to the image's aspect ratio (rows x cols), each grid row followed by a newline token;
- Qwen2-VL / Qwen2.5-VL: per image, the merged patches, (h / m) x (w / m) from `image_grid_thw` = (t, h, w)
  and the vision tower's `spatial_merge_size` m, row-major (one grid per temporal slice).

Several images in a row follow each other in prompt order; the image inputs (`image_sizes`,
`image_grid_thw`) list the batch's images row by row, as the processors make them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GRID_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class TokenGrid:
    """Image tokens laid over one whole image as a [rows, cols] grid of token indices (-1: no token)."""

    image: int  # which image of the row (0-based, prompt order)
    kind: str  # "patches" (LLaVA), "base" / "tiles" (LLaVA-NeXT), "merged" (Qwen)
    tokens: np.ndarray  # [rows, cols] int: indices into the row's image tokens
    # True: the grid covers the image's central square (CLIP's resize-the-short-side-then-centre-crop, LLaVA-1.5)
    square_crop: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])

    def crop(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The (top, left, height, width) pixels of a height x width image that the grid covers."""
        if not self.square_crop:
            return 0, 0, height, width
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def values(self, per_token: Sequence[float] | np.ndarray) -> np.ndarray:
        """[rows, cols] float: `per_token[i]` at token i's cell; NaN where no token lies."""
        per_token = np.asarray(per_token, dtype=float)
        out = np.full(self.tokens.shape, np.nan)
        placed = self.tokens >= 0
        out[placed] = per_token[self.tokens[placed]]
        return out


@dataclass(frozen=True)
class RowLayout:
    """One prompt row's image tokens on their images' grids."""

    count: int  # image tokens in the row
    grids: list[TokenGrid] = field(default_factory=list)
    newlines: dict[int, np.ndarray] = field(default_factory=dict)  # image -> [rows] newline token indices
    unplaced: list[int] = field(default_factory=list)  # tokens on no grid (a CLS token with "full" features)

    @property
    def images(self) -> int:
        return len({g.image for g in self.grids})


def _square(side: int, start: int) -> np.ndarray:
    return start + np.arange(side * side).reshape(side, side)


def _vision_side(config: Any) -> int:
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def _llava_image(config: Any, image: int, start: int) -> tuple[list[TokenGrid], list[int], int]:
    side = _vision_side(config)
    cls = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    grid = TokenGrid(image, "patches", _square(side, start + cls), square_crop=True)
    return [grid], list(range(start, start + cls)), side * side + cls


def unpadded_size(grid_rows: int, grid_cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The (first row, rows, first col, cols) of a [grid_rows, grid_cols] feature grid that cover an image of
    height x width once it was resized into the grid's canvas keeping its aspect ratio and centred."""
    if width / height > grid_cols / grid_rows:  # wider than the canvas: padding above and below
        kept = int(round(height * grid_cols / width, 7))
        pad = (grid_rows - kept) // 2
        return pad, grid_rows - 2 * pad, 0, grid_cols
    kept = int(round(width * grid_rows / height, 7))
    pad = (grid_cols - kept) // 2
    return 0, grid_rows, pad, grid_cols - 2 * pad


def _best_canvas(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The AnyRes canvas (height, width) that keeps most of the image's pixels, then wastes fewest."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution((height, width), [tuple(p) for p in pinpoints]))  # type: ignore[return-value]


def _llava_next_image(config: Any, image: int, start: int, size: Sequence[int]) -> tuple[list[TokenGrid], dict, int]:
    side = _vision_side(config)
    tile = int(config.vision_config.image_size)
    height, width = int(size[0]), int(size[1])
    canvas_h, canvas_w = _best_canvas(height, width, config.image_grid_pinpoints)
    _, rows, _, cols = unpadded_size(canvas_h // tile * side, canvas_w // tile * side, height, width)
    base = TokenGrid(image, "base", _square(side, start))
    first = start + side * side
    # each grid row: cols tile tokens, then one newline token
    row_starts = first + np.arange(rows)[:, None] * (cols + 1)
    tiles = TokenGrid(image, "tiles", row_starts + np.arange(cols)[None, :])
    newlines = first + np.arange(rows) * (cols + 1) + cols
    return [base, tiles], {image: newlines}, side * side + rows * (cols + 1)


def _qwen_image(config: Any, image: int, start: int, thw: Sequence[int]) -> tuple[list[TokenGrid], int]:
    merge = int(config.vision_config.spatial_merge_size)
    t, h, w = (int(x) for x in thw)
    rows, cols = h // merge, w // merge
    grids = [TokenGrid(image, "merged", start + k * rows * cols + np.arange(rows * cols).reshape(rows, cols))
             for k in range(t)]
    return grids, t * rows * cols


def row_layouts(family: str, config: Any, tokens_per_row: Sequence[int], *, image_sizes: Any = None,
                image_grid_thw: Any = None, rows_per_prompt: int = 1) -> list[RowLayout]:
    """Each row's image tokens on their images' grids.

    Args:
        family: the adapter's family ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"; others: one square grid
            per row when its token count is a square).
        config: the model's config (vision tower sizes, AnyRes pinpoints, merge size).
        tokens_per_row: image tokens of each batch row.
        image_sizes: [images, 2] (height, width) of every image, LLaVA-NeXT.
        image_grid_thw: [images, 3] patch grid of every image, Qwen.
        rows_per_prompt: batch rows per prompt (beams, return sequences): the image inputs list the images of
            each prompt once.
    """
    sizes = _as_rows(image_sizes)
    thw = _as_rows(image_grid_thw)
    layouts: list[RowLayout] = []
    next_image = 0
    for b, count in enumerate(tokens_per_row):
        if b % rows_per_prompt:
            layouts.append(layouts[-1])
            continue
        layout = RowLayout(count=int(count))
        used, image = 0, 0
        while used < count:
            if family == "llava":
                grids, unplaced, n = _llava_image(config, image, used)
                layout.unplaced.extend(unplaced)
            elif family == "llava_next":
                grids, newlines, n = _llava_next_image(config, image, used, _take(sizes, next_image, "image_sizes"))
                layout.newlines.update(newlines)
            elif family in ("qwen2_vl", "qwen2_5_vl"):
                grids, n = _qwen_image(config, image, used, _take(thw, next_image, "image_grid_thw"))
            else:
                side = math.isqrt(int(count))
                if side * side != count:
                    raise ValueError(f"no patch grid is known for the family {family!r} and row {b}'s {count} image "
                                     f"tokens are not a square; the pictures support {', '.join(GRID_FAMILIES)}.")
                grids, n = [TokenGrid(0, "patches", _square(side, 0))], int(count)
            layout.grids.extend(grids)
            used += n
            image += 1
            next_image += 1
        if used != count:
            raise ValueError(f"row {b} has {count} image tokens, but its images' {family} grids hold {used}; pass the "
                             f"image inputs (image_sizes / image_grid_thw) of the same call.")
        layouts.append(layout)
    return layouts


def _as_rows(value: Any) -> list[list[int]] | None:
    if value is None:
        return None
    return [[int(x) for x in row] for row in (value.tolist() if hasattr(value, "tolist") else value)]


def _take(rows: list[list[int]] | None, index: int, name: str) -> list[int]:
    if rows is None or index >= len(rows):
        have = 0 if rows is None else len(rows)
        raise ValueError(f"the prompt's image tokens need {name} for image {index}, but {have} were recorded; "
                         f"decode with session.generate(**inputs), which records them, or pass the processor's output "
                         f"to the picture: session.plot(row, inputs=inputs).")
    return rows[index]
