"""Where each image token of a prompt row lies in its image: the families' patch grids.

A row's image tokens are numbered 0 .. n-1 in prompt order (the numbering the methods' reports use for
"image-token indices"). A `RowLayout` lays them on grids that each cover one whole image:

- LLaVA-1.5, VipLLaVA, Video-LLaVA (its images): one (image_size / patch_size)^2 grid per image (24 x 24 for
  336 / 14), row-major, over the image's central square (the processor resizes the short side and crops the centre);
- DeepSeek-VL (and its hybrid's high-resolution view, on the same grid): one (image_size / patch_size)^2 SigLIP
  grid per image, row-major, over the image padded to a centred square (the processor resizes the long side and
  pads the short one);
- LLaVA-NeXT, LLaVA-NeXT-Video (its images): per image, the base view (the same square grid, first), then the
  AnyRes tiles joined into one grid and cut back to the image's aspect ratio (rows x cols), each grid row followed
  by a newline token;
- Granite 4 Vision: as LLaVA-NeXT, each view's grid shrunk by `downsample_rate` (its window Q-Former's queries
  each read one window of patches, in raster order);
- LLaVA-OneVision: as LLaVA-NeXT (base view first, tiles with a newline token per row), the tiles shrunk when
  they exceed `vision_aspect_ratio`'s anyres_max_N budget;
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) / GLM-4.1V / GLM-4.5V / GLM-OCR / EXAONE 4.5 / Qwen2.5-Omni's thinker /
  ERNIE 4.5 VL / HyperCLOVA X Vision V2 / Cosmos 3 Edge / Cohere Compass: per image, the merged patches,
  (h / m) x (w / m) from `image_grid_thw` = (t, h, w) and the vision tower's `spatial_merge_size` m, row-major
  (one grid per temporal slice); VideoLLaMA 3 likewise, m being each image's `image_merge_sizes` (its tower
  shrinks the (h, w) patch grid by bilinear interpolation, which averages each m x m block for m = 2); Kimi K2.5
  (m: `merge_kernel_size`, its tower averages an image's frames) and Muse Glimmer / Muse Spark (m: `merge_size`,
  their tower's pixel shuffle) likewise, and Dots3 Note (its tower's merger reads each m x m block of the processor's
  merge-ordered patches as one token), and MiniMax M3 (its projector reads each m x m block of the processor's
  merge-ordered patches as one token);
- HunyuanOCR (hunyuan_vl): per image, a begin token (on no grid), the (h / m) x (w / m) merged patches row-major
  from `image_grid_thw`, each grid row followed by a newline token, and an end token (on no grid); HY V4 VL likewise
  without the begin and end tokens (its merger's stride-m convolution over the processor's row-major patches, then
  its learned newline after each row);
- Mistral 3, Mistral Large 4 (Mistral 3's Pixtral tower and projector), LightOnOCR: per image,
  (height / (p * m)) x (width / (p * m)) merged patches from `image_sizes`, row-major (the [IMG_BREAK] / [IMG_END]
  tokens are not image tokens);
- Apertus 1.5: per image, its VQ codes, (height / f) x (width / f) row-major from `image_sizes` (the processor's
  resize to multiples of f = the tokenizer's `spatial_scale_factor`; its end-of-row tokens are not image tokens);
- Gemma 4: per image, (rows / k) x (cols / k) pooled patches, row-major, over the whole image (resized keeping its
  aspect ratio to a multiple of k patches a side), from each image's patch rows x cols (`image_patch_grids`, read
  off `image_position_ids`) and the vision tower's `pooling_kernel_size` k (the pooler averages each k x k block);
  Gemma 4 Unified's processor merges the k x k blocks itself: one token per model patch of `image_patch_grids`;
- PaliGemma, Gemma 3: per image, one square grid (SigLIP patches; Gemma 3 pools them to `mm_tokens_per_image`)
  over the whole image, which the processor resizes to a square. Gemma 3's pan-and-scan crops would add views
  that the prompt's tokens cannot tell from images: refused when the pictures show more views than images;
- InternVL, Qianfan-OCR, Aya Vision: pixel-shuffled square tiles; an image cut into n > 1 tiles has them first
  (row-major over a rows x cols canvas, the one of n tiles whose shape is closest to the image's, as the processor
  picks it, so the pictures' sizes are needed) and its thumbnail last. An InternVL or Qianfan-OCR image is one run
  of tokens; Aya's tiles are runs of their own, the image's last one (its thumbnail) followed by <|END_OF_IMG|>;
- GOT-OCR2: InternVL's layout (one run per image: its tiles, then its thumbnail) of tiles whose SAM patches two
  stride-2 convolutions shrink by 4 a side (each token drawn on its 4 x 4-patch cell: "Convolution fields" below);
- Command A Vision (cohere2_vision): Aya's tiles and thumbnail, each run after <|START_OF_IMG|> or a line break,
  an image's first run after <|START_OF_IMG|>; its processor picks the canvas by scale, not by shape (`scale_canvas`);
- Ovis2: square tiles of hidden_stride x hidden_stride merged patches, the thumbnail first (after <IMG_START>),
  then the tiles row-major, <IMG_COL> between the tiles of a canvas row and <IMG_ROW> between rows, which give
  the canvas (an image that is not cut is one run, its whole image);
- FastVLM: per image, side x side tokens, its FastViT-HD tower's last feature map (64x downsampled) row-major, over
  the image's central square (LLaVA's CLIP processor, as its checkpoints ship it); images written back to back share
  a run, split by the row's pictures when they are given, else by `image_seq_length` when it is a square dividing the
  run, else a square run is one image (refused when the config has no `image_seq_length` to tell);
- PerceptionLM: per image, its thumbnail (the picture stretched to a square tile), then its tiles row-major over the
  canvas its processor stretches the picture to (thumb+tile; one view with `vanilla`), each view side x side pooled
  patches; its processor's tile budget is not recorded, so the canvases are the one tiling of the row's pictures
  (`perception_canvas`, the processor's rule) whose token counts fill the row's runs;
- Step 3.7: per image, its local tiles row-major over the picture stretched to whole windows (each tile a run after
  <patch_start>, <patch_newline> between canvas rows), then its global view (the picture stretched to a square,
  after <im_start>); each view's tokens row-major after its two stride-2 convolutions (each token drawn on its
  4 x 4-patch cell: "Convolution fields" below); a thin picture the processor pads to a square is refused when the
  pictures are given (without them the maps are drawn as bare token grids, with no picture to misplace them over);
- Molmo2: per image, its low-resolution view (the picture stretched to one crop) then its high-resolution canvas
  (the picture stretched to its overlapping crops' canvas, the overlaps dropped), each a grid of pooled patches
  row-major, a run per row after <low_res_im_start> / <im_start> or <im_col> (refused without those column tokens:
  image_use_col_tokens=False for the canvas, use_single_crop_col_tokens=False for the low-resolution view); a grid
  whose patches are not whole pooling windows reaches past the picture by under one window (drawn over the picture:
  off by under a window);
- Fuyu: one run of patch tokens per patch row (the processor puts |NEWLINE| after each), row-major over the image
  shrunk to fit the processor's target (never enlarged) and padded to whole patches at the bottom and right: the
  grid reaches past the picture by under a patch (`TokenGrid.patch_pixels`);
- Llama 4: per image of several tiles, its tiles row-major (each a run, <|tile_x_separator|> between a canvas row's
  tiles, <|tile_y_separator|> after each row) over the picture resized (aspect kept, a side under one tile enlarged
  up to it) into the tile canvas's top-left corner and padded (`TokenGrid.enlarge_to`), then its global view (the
  picture stretched to one tile) after <|image|>; an image of one tile is that tile alone; each tile's tokens
  row-major (its pixel shuffle, checked through the vision tower);
- Idefics3 / SmolVLM: pixel-shuffled square tiles, each a run after its <row_i_col_j> token, then the global
  image after <global-img> (an image that is not split is its global image alone);
- Granite-Docling: Idefics3's named tiles and global image, except that an image that is not split is one tile
  after <row_1_col_1> with no global image; a tile's side is doubled on the fine connector path (fine_route).

Convolution fields (GOT-OCR2, Step 3.7): two stacked convolutions of kernel 3, stride 2 and padding 1 give token k
(along each axis) a field of patches 4k - 3 .. 4k + 3, centred on patch 4k, the first of its cell's 4 patches
4k .. 4k + 3: 1.5 patches (3/8 of a cell) up and left of the cell's centre, and the top row's and left column's
fields reach into the padding. vlmfix draws each token on its cell (the token grid's own shape and extent), not on
its field.

Several images in a row follow each other in prompt order; the image inputs (`image_sizes`, `image_grid_thw`,
`image_merge_sizes`, `image_patch_grids`) list the batch's images row by row, as the processors make them. The other
supported families are refused by name (`REFUSED`, with the reason).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

SQUARE_FAMILIES = ("llava", "vipllava", "video_llava")  # one CLIP grid per image, over its centre crop
LETTERBOX_FAMILIES = ("deepseek_vl", "deepseek_vl_hybrid")  # one grid per image, over it padded to a square
# base view, then tiles with newlines (Granite 4 Vision's views shrunk by its window Q-Former)
ANYRES_FAMILIES = ("llava_next", "llava_next_video", "llava_onevision", "granite4_vision")
PIXTRAL_FAMILIES = ("mistral3", "mistral_large4", "lighton_ocr")  # merged Pixtral patches from `image_sizes`
VQ_FAMILIES = ("apertus1p5",)  # one VQ code per spatial_scale_factor^2 pixels, from `image_sizes`
MERGED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "glm46v", "glm_ocr",
                   "exaone4_5", "qwen2_5_omni_thinker", "ernie4_5_vl_moe", "hyperclovax_vision_v2", "cosmos3_edge",
                   "cohere_compass", "kimi_k25", "muse_glimmer", "muse_spark", "dots3_note", "minimax_m3_vl",
                   "llava_onevision1_5")
INTERNVL_FAMILIES = ("internvl", "qianfan_ocr")  # InternVL's tiles + thumbnail (Qianfan-OCR is built on it)
ONE_RUN_TILE_FAMILIES = (*INTERNVL_FAMILIES, "got_ocr2")  # an image's tiles and thumbnail in one run
# merged patches from `image_grid_thw`, a newline after each row (HunyuanOCR's between a begin and an end token)
NEWLINE_MERGED_FAMILIES = ("hunyuan_vl", "hy_v4_vl")
POOLED_FAMILIES = ("gemma4", "gemma4_unified")  # k x k pooled patches from `image_patch_grids`
PER_IMAGE_MERGE_FAMILIES = ("video_llama_3",)  # merged patches from `image_grid_thw` and `image_merge_sizes`
RUN_FAMILIES = ("paligemma", "gemma3", *ONE_RUN_TILE_FAMILIES, "aya_vision", "cohere2_vision", "ovis2", "idefics3",
                "smolvlm", "granite_docling", "fuyu", "fast_vlm", "perception_lm", "step3p7", "molmo2", "llama4")
# the reason a newly supported family carries in REFUSED until its layout is mapped and checked (none at present)
UNCHECKED = "its image tokens' layout is not mapped (no grid checked against its processor and vision tower)"
# supported families whose image tokens the pictures do not place, and why
REFUSED: dict[str, str] = {
    "idefics2": "its perceiver resampler's latents each summarise the whole image: no token has a place",
    "paddleocr_vl": "its processor orders patches unlike the merged-patch families (checked: the Qwen grid is wrong)",
    "aria": "its projector's learned queries each cross-attend to every patch of the image: no token has a place",
    "deepseek_ocr2": "its image tokens are learned queries that each attend to every patch of the view (and to the "
                     "queries before them): no token has a place",
    "unlimited_ocr": "not mapped: each image is one run of <image> tokens (local tiles, global view, their row ends "
                     "and the view separator alike), whose split and geometry follow processor settings that neither "
                     "the prompt nor the model's inputs record: the global view is stretched to a square "
                     "(crop_to_patches off, size up to maximum_pad_value) or letterboxed (otherwise), which an image "
                     "with no local tiles cannot tell apart, and the global and tile grids' sides (size, tile_size) "
                     "are not in the config",
    "ovis2_5": "transformers 5.25's Ovis2_5Model.get_image_features gives its visual tokenizer the last encoder "
               "layer's output in the vision tower's window order (modeling_ovis2_5.py: `hidden_states[-1]`, recorded "
               "before the tower's `reverse_indices` put its last_hidden_state back), so the image tokens follow the "
               "tower's windows, not the merged grid (AIDC-AI's Ovis2.5 code restores the grid's order)",
}
GRID_FAMILIES = (*SQUARE_FAMILIES, *LETTERBOX_FAMILIES, *ANYRES_FAMILIES, *PIXTRAL_FAMILIES, *VQ_FAMILIES,
                 *MERGED_FAMILIES, *NEWLINE_MERGED_FAMILIES, *PER_IMAGE_MERGE_FAMILIES, *POOLED_FAMILIES, *RUN_FAMILIES)


@dataclass(frozen=True)
class TokenGrid:
    """Image tokens laid over one whole image as a [rows, cols] grid of token indices (-1: no token)."""

    image: int  # which image of the row (0-based, prompt order)
    kind: str  # "patches" (LLaVA), "base" / "tiles" (LLaVA-NeXT), "merged" (Qwen), "codes" (Apertus 1.5's VQ)
    tokens: np.ndarray  # [rows, cols] int: indices into the row's image tokens
    # True: the grid covers the image's central square (CLIP's resize-the-short-side-then-centre-crop, LLaVA-1.5)
    square_crop: bool = False
    # True: the grid covers the image padded to a centred square (DeepSeek-VL's resize-the-long-side-then-pad)
    letterbox: bool = False
    # > 0: the grid's cells are patches of this many pixels of the image shrunk to fit a target (never enlarged),
    # from its top-left corner, the last row and column reaching past it (Fuyu's padding to whole patches)
    patch_pixels: int = 0
    # with patch_pixels: an image side under this many pixels is enlarged up to it (or to the target, if smaller)
    # before the fit (Llama 4's resize onto its tile canvas)
    enlarge_to: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])

    def crop(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The (top, left, height, width) pixels of a height x width image that the grid covers."""
        if not self.square_crop:
            return 0, 0, height, width
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def extent(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the grid in the pixels of the part of a height x width image that `crop`
        keeps (matplotlib's `extent`): the part itself, or the padded square around it (`letterbox`)."""
        if self.patch_pixels:
            high, wide = self.shape[0] * self.patch_pixels, self.shape[1] * self.patch_pixels  # the target's pixels
            # the resize factor: that of the side that fills its (capped) target, 1 for a picture within it that no
            # enlarge_to enlarges
            scale = min(min(high, max(height, self.enlarge_to)) / height,
                        min(wide, max(width, self.enlarge_to)) / width)
            return 0.0, wide / scale, high / scale, 0.0
        if not self.letterbox:
            return 0.0, float(width), float(height), 0.0
        pad_x, pad_y = (max(height, width) - width) / 2, (max(height, width) - height) / 2
        return -pad_x, width + pad_x, height + pad_y, -pad_y

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


def _grid(rows: int, cols: int, start: int) -> np.ndarray:
    """Token positions `start`, `start + 1`, ... laid out row-major over `rows` x `cols` cells."""
    return start + np.arange(rows * cols).reshape(rows, cols)


def _square(side: int, start: int) -> np.ndarray:
    return _grid(side, side, start)


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


def _llava_next_image(config: Any, image: int, start: int, size: Sequence[int],
                      max_tiles: int | None = None) -> tuple[list[TokenGrid], dict, int]:
    """LLaVA-NeXT (`max_tiles` None) and LLaVA-OneVision (anyres_max_N: tiles shrunk past N tiles' tokens)."""
    side = _vision_side(config)
    if getattr(config, "downsample_rate", None):  # Granite 4 Vision: e.g. "1/4" of each view's side
        side = int(side * Fraction(config.downsample_rate))
    tile = int(config.vision_config.image_size)
    height, width = int(size[0]), int(size[1])
    canvas_h, canvas_w = _best_canvas(height, width, config.image_grid_pinpoints)
    _, rows, _, cols = unpadded_size(canvas_h // tile * side, canvas_w // tile * side, height, width)
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:  # OneVision interpolates the unpadded tiles down to this grid
            rows, cols = int(rows // ratio), int(cols // ratio)
    base = TokenGrid(image, "base", _square(side, start))
    tiles, newlines = _rows_with_newlines(image, "tiles", start + side * side, rows, cols)
    return [base, tiles], {image: newlines}, side * side + rows * (cols + 1)


def _rows_with_newlines(image: int, kind: str, first: int, rows: int, cols: int) -> tuple[TokenGrid, np.ndarray]:
    """A [rows, cols] grid of tokens from index `first` on where each row is followed by one newline token (LLaVA-NeXT's
    tiles, HunyuanOCR's merged patches): the grid and the newline tokens' indices [rows]."""
    row_starts = first + np.arange(rows)[:, None] * (cols + 1)  # [rows, 1]
    return TokenGrid(image, kind, row_starts + np.arange(cols)[None, :]), row_starts[:, 0] + cols


def _onevision_max_tiles(config: Any) -> int:
    aspect = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    return int(aspect.removeprefix("anyres_max_"))


def _qwen_image(config: Any, image: int, start: int, thw: Sequence[int], merge: int | None = None
                ) -> tuple[list[TokenGrid], int]:
    vision = config.vision_config
    if merge is None:  # Qwen's `spatial_merge_size`, Kimi K2.5's `merge_kernel_size`, Muse's `merge_size`
        merge = _pair(getattr(vision, "spatial_merge_size", None) or getattr(vision, "merge_kernel_size", None)
                      or vision.merge_size)
    t, h, w = (int(x) for x in thw)
    rows, cols = h // merge, w // merge
    grids = [TokenGrid(image, "merged", _grid(rows, cols, start + k * rows * cols)) for k in range(t)]
    return grids, t * rows * cols


def _newline_merged_image(family: str, config: Any, image: int, start: int, thw: Sequence[int]
                          ) -> tuple[list[TokenGrid], dict, list[int], int]:
    """Rows of merged patches each ended by a newline token; HunyuanOCR's between a begin and an end token."""
    merge = int(config.vision_config.spatial_merge_size)
    _, h, w = (int(x) for x in thw)  # one temporal slice: the merger reshapes each image's patches to (h, w)
    rows, cols = h // merge, w // merge
    ends = family == "hunyuan_vl"  # its begin and end tokens are image tokens too
    first = start + ends
    grid, newlines = _rows_with_newlines(image, "merged", first, rows, cols)
    unplaced = [start, first + rows * (cols + 1)] if ends else []
    return [grid], {image: newlines}, unplaced, rows * (cols + 1) + 2 * ends


def _cells_image(image: int, start: int, size: Sequence[int], step: int, kind: str) -> tuple[list[TokenGrid], int]:
    """One row-major grid of cells `step` a side over `size` (height, width): Pixtral's merged patches over the
    processed image's pixels, Apertus 1.5's VQ codes (`step`: its tokenizer's downsampling), or the pooled patches
    of the pooling families over their patch grid (`step`: the pooling kernel)."""
    rows, cols = int(size[0]) // step, int(size[1]) // step
    return [TokenGrid(image, kind, _grid(rows, cols, start))], rows * cols


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """(first image-token index, length) of each run of consecutive positions."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(positions):
        if i and p == positions[i - 1] + 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _tile_side(family: str, config: Any) -> int:
    """Tokens per side of one square tile (or image) of a run-based family."""
    vision = config.vision_config
    side = _pair(vision.image_size) // _pair(vision.patch_size)
    if family == "gemma3":
        return math.isqrt(int(config.mm_tokens_per_image))
    if family in INTERNVL_FAMILIES:
        return int(side * float(config.downsample_ratio))
    if family in ("aya_vision", "cohere2_vision"):
        return side // int(config.downsample_factor)
    if family in ("idefics3", "smolvlm"):
        return side // int(config.scale_factor)
    if family == "got_ocr2":  # two 3 x 3 convolutions of stride 2 and padding 1: ceil(n / 2) each
        return math.ceil(math.ceil(side / 2) / 2)
    if family == "granite_docling":  # the coarse path (the fine one halves the factor: `_granite_docling_row`)
        return side // int(vision.scale_factor)
    if family == "llama4":
        return int(side * float(vision.pixel_shuffle_ratio))
    if family == "ovis2":  # the tower pads the patch grid to a multiple of the stride, then merges
        return -(-side // int(vision.hidden_stride))
    return side  # paligemma


def tile_canvas(tiles: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of `tiles` tiles whose shape is closest to a height x width image's (GOT-OCR2's rule, which
    InternVL's and Aya Vision's processors pick their canvas by; among canvases of `tiles` tiles it is unique)."""
    shapes = [(tiles // c, c) for c in range(1, tiles + 1) if tiles % c == 0]
    return min(shapes, key=lambda rc: abs(width / height - rc[1] / rc[0]))


def scale_canvas(tiles: int, height: int, width: int, tile_pixels: int) -> tuple[int, int]:
    """(rows, cols) of `tiles` tiles of tile_pixels a side that Command A Vision's processor picks for a height x
    width image: the canvas that needs the smallest upscale, else (every canvas shrinks it) the smallest downscale;
    among canvases of `tiles` tiles (cols ascending, as it lists them) this is its pick."""
    shapes = [(tiles // c, c) for c in range(1, tiles + 1) if tiles % c == 0]
    scales = [min(c * tile_pixels / width, r * tile_pixels / height) for r, c in shapes]
    if all(scale < 1 for scale in scales):
        return shapes[max(range(len(shapes)), key=lambda k: scales[k])]
    return shapes[min(range(len(shapes)), key=lambda k: scales[k] if scales[k] >= 1 else math.inf)]


def _fuyu_row(config: Any, b: int, runs: Sequence[tuple[int, int]]) -> list[TokenGrid]:
    """Fuyu: one image per prompt, one run of patch tokens per patch row."""
    if len({length for _, length in runs}) > 1:
        raise ValueError(f"row {b}'s fuyu patch rows have different lengths {[n for _, n in runs]}.")
    if not runs:
        return []
    cols = runs[0][1]
    tokens = _grid(len(runs), cols, 0)
    return [TokenGrid(0, "patches", tokens, patch_pixels=_pair(config.patch_size))]


def _fast_vlm_row(config: Any, b: int, runs: Sequence[tuple[int, int]], shapes: Sequence[Sequence[int]] | None
                  ) -> list[TokenGrid]:
    """FastVLM: each image side x side tokens, its tower's last feature map row-major; images whose placeholders are
    written back to back share a run. Every image has the same count (the processor's one crop size): the row's
    tokens over its pictures when they are given, else the config's `image_seq_length` when it is a square that
    divides the run, else a square run is one image (refused when the config has no `image_seq_length`: one image,
    or several?)."""
    per_image = int(getattr(config, "image_seq_length", 0) or 0)
    if shapes is not None:  # the pictures decide: the row's tokens split evenly over them
        total = sum(length for _, length in runs)
        per_image = total // len(shapes) if shapes else 0
        if not shapes or per_image * len(shapes) != total or not _is_square(per_image) or any(
                length % per_image for _, length in runs):
            raise ValueError(f"row {b}'s fast_vlm image-token runs {[n for _, n in runs]} are not {len(shapes)} "
                             f"equal square feature maps, one per picture passed; pass the row's own pictures.")
    grids: list[TokenGrid] = []
    for start, length in runs:
        per_run = per_image
        if shapes is None and not (_is_square(per_image) and length % per_image == 0):
            if not _is_square(length):
                raise ValueError(f"row {b} has a run of {length} fast_vlm image tokens: neither one square feature "
                                 f"map nor whole images of image_seq_length={per_image}; set the config's "
                                 f"image_seq_length to the processor's tokens per image, or pass the pictures.")
            if per_image == 0:  # one image, or back-to-back images of a smaller square: nothing tells
                raise ValueError(f"row {b} has a run of {length} fast_vlm image tokens, one square feature map or "
                                 f"several images written back to back, and the config has no image_seq_length to "
                                 f"tell: pass the row's pictures, session.plot(row, images=[...]), or set "
                                 f"image_seq_length.")
            per_run = length  # the config's count does not divide it: one image
        side = math.isqrt(per_run)
        for first in range(start, start + length, per_run):
            grids.append(TokenGrid(len(grids), "patches", _square(side, first), square_crop=True))
    return grids


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


PERCEPTION_MAX_TILES = 64  # the largest max_num_tiles tried when matching a row's tokens to its pictures


def _perception_sizes(config: Any) -> tuple[int, int]:
    """(tile pixels, tokens a side of one view) of PerceptionLM: its timm tower's image size and patch size (from
    `model_args`, else the architecture's name, e.g. vit_pe_core_large_patch14_336), shrunk by the projector's
    pooling."""
    vision = config.vision_config
    args = dict(getattr(vision, "model_args", None) or {})
    name = str(getattr(vision, "architecture", ""))
    size = args.get("img_size") or (re.findall(r"_(\d+)$", name) or [None])[0]
    patch = args.get("patch_size") or (re.findall(r"patch(\d+)", name) or [None])[0]
    if size is None or patch is None:
        raise ValueError(f"perception_lm's tower {name!r} names no image and patch size (model_args img_size / "
                         f"patch_size): its views' token grids are unknown.")
    tile = _pair(size)
    return tile, tile // _pair(patch) // int(getattr(config, "projector_pooling_ratio", 1) or 1)


def _arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """PerceptionLM's (tiles across, tiles down) canvases of up to max_tiles tiles, in the order its processor
    visits them: grouped by aspect ratio, the ratios in order of first appearance from max_tiles tiles down."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for across in sorted({d for d in range(1, count + 1) if count % d == 0}):
            by_ratio.setdefault(across / (count // across), []).append((across, count // across))
    return [canvas for canvases in by_ratio.values() for canvas in canvases]


def perception_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of tiles PerceptionLM's processor stretches a height x width picture over, for `max_tiles`: of
    the canvases the picture fits in, the one that enlarges it most (the last such in its order); if it fits in
    none, the aspect ratio nearest the picture's on its side of 1 (the widest, or tallest, canvas of it)."""
    arrangements = _arrangements(max_tiles)
    scale = width / height
    best, best_size = None, (0.0, 0.0)
    for across, down in arrangements:
        if across * tile < width or down * tile < height:
            continue
        factor = min(across * tile / width, down * tile / height)
        size = ((factor * width, math.floor(factor * width / scale)) if scale > 1.0
                else (math.floor(factor * height * scale), factor * height))
        if best is None or size[0 if scale < 1.0 else 1] >= best_size[0 if scale < 1.0 else 1]:
            best, best_size = (across, down), size
    if best is None:
        ratios = list(dict.fromkeys(a / d for a, d in arrangements))
        if scale >= 1:
            ratio = min((k for k in ratios if k <= scale), key=lambda k: abs(k - scale))
            best = max((c for c in arrangements if c[0] / c[1] == ratio), key=lambda c: c[0])
        else:
            ratio = min((k for k in ratios if k > scale), key=lambda k: abs(1 / k - 1 / scale))
            best = max((c for c in arrangements if c[0] / c[1] == ratio), key=lambda c: c[1])
    return best[1], best[0]


def _perception_row(config: Any, b: int, runs: Sequence[tuple[int, int]], shapes: Sequence[Sequence[int]] | None
                    ) -> list[TokenGrid]:
    """PerceptionLM: per image, its thumbnail (the picture stretched to one tile), then its tiles row-major over a
    canvas the picture is stretched to; images may follow each other in one run. The tiling depends on the
    processor's max_num_tiles, which the model does not record: the one layout that every max_num_tiles (1 ..
    PERCEPTION_MAX_TILES; or one view per image, `vanilla`) matching the row's runs gives."""
    tile, side = _perception_sizes(config)
    per_view = side * side
    if shapes is None:
        raise ValueError(f"row {b}'s perception_lm images are cut into tiles whose canvas depends on the pictures' "
                         f"sizes: pass the row's pictures, session.plot(row, images=[...]).")
    pictures = [(int(h), int(w)) for h, w in shapes]
    # each layout: per picture, (rows, cols) of its tiles or None (one view, `vanilla`)
    candidates: dict[tuple[tuple[int, int] | None, ...], None] = {}  # the matching ones, in order
    layouts: list[list[tuple[int, int] | None]] = [[perception_canvas(h, w, tile, m) for h, w in pictures]
                                                   for m in range(1, PERCEPTION_MAX_TILES + 1)]
    layouts.append([None] * len(pictures))
    for canvases in layouts:
        views = [1 + (c[0] * c[1] if c else 0) for c in canvases]
        if _fills_runs([v * per_view for v in views], [length for _, length in runs]):
            candidates[tuple(canvases)] = None
    if len(candidates) != 1:
        found = "no tiling" if not candidates else f"{len(candidates)} tilings"
        raise ValueError(f"row {b}'s perception_lm image-token runs {[n for _, n in runs]} match {found} of its "
                         f"{len(pictures)} pictures (sizes {pictures}) for any max_num_tiles up to "
                         f"{PERCEPTION_MAX_TILES}; pass the row's own pictures, in prompt order.")
    grids: list[TokenGrid] = []
    start = runs[0][0] if runs else 0
    for image, canvas in enumerate(next(iter(candidates))):
        if canvas is None:
            grids.append(TokenGrid(image, "patches", _square(side, start)))
            start += per_view
            continue
        rows, cols = canvas
        grids.append(TokenGrid(image, "thumbnail", _square(side, start)))
        grids.append(_canvas(image, start + per_view, side, rows, cols))
        start += per_view * (1 + rows * cols)
    return grids


def _fills_runs(counts: Sequence[int], lengths: Sequence[int]) -> bool:
    """Whether images of `counts` tokens, in order, fill runs of `lengths` exactly (an image never spans runs)."""
    images = iter(counts)
    for length in lengths:
        while length > 0:
            length -= next(images, length + 1)
        if length:
            return False
    return next(images, None) is None


def _cohere_row(config: Any, b: int, runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]], side: int,
                shapes: Sequence[Sequence[int]] | None) -> list[TokenGrid]:
    """Command A Vision: an image's runs (one tile each, line breaks between) start after <|START_OF_IMG|>."""
    images: list[list[int]] = []  # each image's run starts (first image-token index)
    for (start, _), (name, _) in zip(runs, names):
        if name == "<|START_OF_IMG|>":
            images.append([start])
        elif images:
            images[-1].append(start)
        else:
            raise ValueError(f"row {b}'s first cohere2_vision image-token run follows {name!r}, not <|START_OF_IMG|>.")
    grids: list[TokenGrid] = []
    for image, starts in enumerate(images):
        if len(starts) == 1:
            grids.append(TokenGrid(image, "patches", _square(side, starts[0])))
            continue
        height, width = _shape_of(shapes, image, b, "cohere2_vision")
        rows, cols = scale_canvas(len(starts) - 1, height, width, _pair(config.vision_config.image_size))
        grids.extend(_tiles_and_thumbnail(image, starts[0], side, rows, cols, "thumbnail"))
    return grids


def _canvas(image: int, start: int, side: int, rows: int, cols: int) -> TokenGrid:
    """Tiles row-major over a rows x cols canvas, each tile's tokens row-major, from token `start` on."""
    r, c = np.mgrid[0 : rows * side, 0 : cols * side]
    tile = (r // side) * cols + c // side
    return TokenGrid(image, "tiles", start + tile * side * side + (r % side) * side + c % side)


def _tiles_and_thumbnail(image: int, start: int, side: int, rows: int, cols: int, last: str) -> list[TokenGrid]:
    """Tiles row-major over a rows x cols canvas (each tile's tokens row-major), then one square `last` view."""
    thumbnail = TokenGrid(image, last, _square(side, start + rows * cols * side * side))
    return [_canvas(image, start, side, rows, cols), thumbnail]


def _ovis_row(b: int, runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]], side: int
              ) -> list[TokenGrid]:
    """Ovis2: per image, the thumbnail's run after <IMG_START>, then the tiles', <IMG_COL> / <IMG_ROW> after each."""
    images: list[list[tuple[int, str]]] = []  # per image: (first image-token index, token after) of each run
    for (start, _), (name, after) in zip(runs, names):
        if name == "<IMG_START>":
            images.append([])
        elif not images:
            raise ValueError(f"row {b}'s first ovis2 image-token run follows {name!r}, not <IMG_START>.")
        images[-1].append((start, after))
    grids: list[TokenGrid] = []
    for image, image_runs in enumerate(images):
        whole = TokenGrid(image, "patches" if len(image_runs) == 1 else "thumbnail", _square(side, image_runs[0][0]))
        grids.append(whole)
        tiles = image_runs[1:]
        if not tiles:
            continue
        cols = next((k + 1 for k, (_, after) in enumerate(tiles) if after != "<IMG_COL>"), len(tiles))
        if len(tiles) % cols:
            raise ValueError(f"row {b}'s ovis2 image {image} has {len(tiles)} tiles, not rows of {cols}.")
        grids.append(_canvas(image, tiles[0][0], side, len(tiles) // cols, cols))
    return grids


def _run_family_row(family: str, config: Any, b: int, positions: Sequence[int],
                    before: Sequence[Sequence[int]] | None,
                    tokenizer: Any, shapes: Sequence[Sequence[int]] | None) -> list[TokenGrid]:
    """The grids of one row of a family whose image inputs do not place its tokens (see the module docstring)."""
    if family == "fuyu":
        return _fuyu_row(config, b, _runs(positions))
    if family == "fast_vlm":
        return _fast_vlm_row(config, b, _runs(positions), shapes)
    if family == "perception_lm":
        return _perception_row(config, b, _runs(positions), shapes)
    if family in ("step3p7", "molmo2"):  # views named by the token before each run (their rows' or tiles' runs)
        names = _token_names(before, tokenizer, b, family)
        if family == "step3p7":
            return _step3_row(b, positions, _runs(positions), names, shapes)
        return _molmo2_row(b, _runs(positions), names)
    side = _tile_side(family, config)
    per_tile = side * side
    count = len(positions)
    if family in ("paligemma", "gemma3"):
        if count % per_tile:
            raise ValueError(f"row {b}'s {count} image tokens are not whole {side} x {side} {family} images.")
        views = count // per_tile
        if shapes is not None and len(shapes) != views:
            raise ValueError(f"row {b} has {views} {family} image views but {len(shapes)} pictures: Gemma 3's "
                             f"pan-and-scan crops cannot be placed from the prompt; run without do_pan_and_scan.")
        return [TokenGrid(k, "patches", _square(side, k * per_tile)) for k in range(views)]
    runs = _runs(positions)
    if family in ONE_RUN_TILE_FAMILIES:
        grids: list[TokenGrid] = []
        for image, (start, length) in enumerate(runs):
            if length % per_tile:
                raise ValueError(f"row {b}'s image {image} has {length} tokens, not whole {side} x {side} tiles.")
            tiles = length // per_tile
            if tiles == 1:
                grids.append(TokenGrid(image, "patches", _square(side, start)))
                continue
            rows, cols = tile_canvas(tiles - 1, *_shape_of(shapes, image, b, family))
            grids.extend(_tiles_and_thumbnail(image, start, side, rows, cols, "thumbnail"))
        return grids
    names = _token_names(before, tokenizer, b, family)  # [before, after] of each run
    if family == "granite_docling":
        return _granite_docling_row(config, b, runs, names, side)
    for _, length in runs:
        if length != per_tile:
            raise ValueError(f"row {b} has a run of {length} {family} image tokens, not one {side} x {side} tile.")
    if family == "cohere2_vision":
        return _cohere_row(config, b, runs, names, side, shapes)
    if family == "ovis2":
        return _ovis_row(b, runs, names, side)
    if family == "llama4":
        return _llama4_row(config, b, runs, names, side)
    grids, image, tile_runs = [], 0, []
    for (start, _), (name, next_name) in zip(runs, names):
        ends_image = next_name == "<|END_OF_IMG|>" if family == "aya_vision" else name == "<global-img>"
        if not ends_image:
            tile_runs.append((start, name))
            continue
        if not tile_runs:
            grids.append(TokenGrid(image, "patches", _square(side, start)))
        elif family == "aya_vision":
            rows, cols = tile_canvas(len(tile_runs), *_shape_of(shapes, image, b, family))
            grids.extend(_tiles_and_thumbnail(image, tile_runs[0][0], side, rows, cols, "thumbnail"))
        else:  # Idefics3 / SmolVLM: <row_i_col_j> names each tile
            grids.extend(_idefics_tiles(image, tile_runs, side, b))
            grids.append(TokenGrid(image, "global", _square(side, start)))
        image, tile_runs = image + 1, []
    if tile_runs:
        raise ValueError(f"row {b}'s last {family} image has tiles but no global image run after them.")
    return grids


LLAMA4_TILE_STARTS = ("<|image_start|>", "<|tile_x_separator|>", "<|tile_y_separator|>")


def _llama4_row(config: Any, b: int, runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]], side: int
                ) -> list[TokenGrid]:
    """Llama 4: per image of several tiles, its tiles row by row (a run each, the first after <|image_start|>,
    <|tile_x_separator|> between a row's tiles, <|tile_y_separator|> after each row) over the picture resized onto
    the tile canvas (`TokenGrid.enlarge_to`, padded at the bottom and right), then the global view (the picture
    stretched to one tile) after <|image|>; an image of one tile is that tile's run after <|image|> alone. The resize
    is its processor's default (resize_to_max_canvas=False: a side enlarged at most to one tile)."""
    tile_pixels = _pair(config.vision_config.image_size)
    grids: list[TokenGrid] = []
    canvas_rows: list[list[int]] = []  # the pending image's tiles' first tokens, row by row
    for (start, _), (name, _) in zip(runs, names):
        image = len({g.image for g in grids})
        if name != "<|image|>":
            if name not in LLAMA4_TILE_STARTS or (name == "<|image_start|>") == bool(canvas_rows):
                raise ValueError(f"row {b}: a llama4 tile run follows {name!r}, not <|image_start|> (an image's "
                                 f"first tile) or a tile separator (its others).")
            if name != "<|tile_x_separator|>":
                canvas_rows.append([])
            canvas_rows[-1].append(start)
            continue
        if not canvas_rows:  # one tile: the picture resized to fit it
            grids.append(TokenGrid(image, "patches", _square(side, start), patch_pixels=tile_pixels // side,
                                   enlarge_to=tile_pixels))
            continue
        cols = len(canvas_rows[0])
        if any(len(row) != cols for row in canvas_rows):
            raise ValueError(f"row {b}'s llama4 image {image} has canvas rows of {[len(r) for r in canvas_rows]} "
                             f"tiles, not equal rows.")
        tiles = _canvas(image, canvas_rows[0][0], side, len(canvas_rows), cols)
        grids.append(TokenGrid(image, "tiles", tiles.tokens, patch_pixels=tile_pixels // side,
                               enlarge_to=tile_pixels))
        grids.append(TokenGrid(image, "global", _square(side, start)))
        canvas_rows = []
    if canvas_rows:
        raise ValueError(f"row {b}'s last llama4 image has tiles but no global view run after <|image|>.")
    return grids


STEP3_ROW_GAP = {2: False, 3: True}  # tokens between two tile runs -> a new canvas row (<patch_newline> between)


def _step3_row(b: int, positions: Sequence[int], runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]],
               shapes: Sequence[Sequence[int]] | None) -> list[TokenGrid]:
    """Step 3.7: per image, its local tiles row by row (a run after each <patch_start>, <patch_end> after it and
    <patch_newline> ending a canvas row, seen as a wider gap in the prompt positions), then its global view (the run
    after <im_start>); an image that is not cut is its global view alone."""
    grids: list[TokenGrid] = []
    tiles: list[tuple[int, int]] = []  # the pending image's tile runs: (first token, length)
    rows = 1
    for (start, length), (name, _) in zip(runs, names):
        if name == "<patch_start>":
            if tiles:
                gap = positions[start] - positions[start - 1] - 1  # tokens between this run and the previous one
                if gap not in STEP3_ROW_GAP:
                    raise ValueError(f"row {b}'s step3p7 tile runs are {gap} tokens apart, not <patch_end> "
                                     f"[<patch_newline>] <patch_start>.")
                rows += STEP3_ROW_GAP[gap]
            tiles.append((start, length))
            continue
        if name != "<im_start>":
            raise ValueError(f"row {b}: a step3p7 image-token run follows {name!r}, not <patch_start> or <im_start>.")
        image = len({g.image for g in grids})
        _check_step3_picture(shapes, image, b)
        side = _square_side(length, b, "global view")
        if not tiles:
            grids.append(TokenGrid(image, "patches", _square(side, start)))
            continue
        tile = _square_side(tiles[0][1], b, "tile")
        if any(n != tiles[0][1] for _, n in tiles) or len(tiles) % rows:
            raise ValueError(f"row {b}'s step3p7 image {image} has tiles {[n for _, n in tiles]} in {rows} rows: "
                             f"not a canvas of equal tiles.")
        grids.append(_canvas(image, tiles[0][0], tile, rows, len(tiles) // rows))
        grids.append(TokenGrid(image, "global", _square(side, start)))
        tiles, rows = [], 1
    if tiles:
        raise ValueError(f"row {b}'s last step3p7 image has tiles but no global view run after them.")
    return grids


MOLMO2_VIEW_STARTS = ("<low_res_im_start>", "<im_start>")


def _molmo2_row(b: int, runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]]) -> list[TokenGrid]:
    """Molmo2: per image, its low-resolution view then its high-resolution canvas, each a grid of pooled patches
    written row by row (a run per row, <im_col> after each; a view starts after <low_res_im_start> or <im_start>)."""
    views: list[list[tuple[int, int]]] = []  # each view's row runs
    for (start, length), (name, after) in zip(runs, names):
        if name in MOLMO2_VIEW_STARTS:
            views.append([])
        elif name != "<im_col>" or not views:
            raise ValueError(f"row {b}: a molmo2 image-token run follows {name!r}, not a view start or <im_col>.")
        if after != "<im_col>":
            which, setting = (("low-resolution view", "use_single_crop_col_tokens") if len(views) % 2 else
                              ("canvas", "image_use_col_tokens"))
            raise ValueError(f"row {b}'s molmo2 {which} rows end with {after!r}, not <im_col>: without column tokens "
                             f"its rows cannot be told apart. Its processor writes them unless {setting}=False "
                             f"(image_use_col_tokens: the canvas; use_single_crop_col_tokens, None meaning "
                             f"image_use_col_tokens: the low-resolution view); keep both on.")
        views[-1].append((start, length))
    if len(views) % 2:
        raise ValueError(f"row {b} has {len(views)} molmo2 views: not a low-resolution view and a canvas per image.")
    grids: list[TokenGrid] = []
    for k, view in enumerate(views):
        width = view[0][1]
        if any(length != width for _, length in view):
            raise ValueError(f"row {b}'s molmo2 view has rows of {[n for _, n in view]} tokens, not equal rows.")
        tokens = _grid(len(view), width, view[0][0])
        grids.append(TokenGrid(k // 2, "low_res" if k % 2 == 0 else "canvas", tokens))
    return grids


def _square_side(length: int, b: int, what: str) -> int:
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"row {b} has a step3p7 {what} of {length} tokens, not a square grid.")
    return side


def _check_step3_picture(shapes: Sequence[Sequence[int]] | None, image: int, b: int) -> None:
    """Step 3.7's processor pads a picture under 32 pixels a side and over 4:1 to a square (its top-left corner):
    the grids would not cover the picture, so such a picture is refused. Without the pictures (shapes None) there is
    nothing to check: the maps are drawn as bare token grids, on no picture."""
    if shapes is None:
        return
    if image >= len(shapes):
        raise ValueError(f"row {b} has more step3p7 images than the {len(shapes)} pictures passed; pass the row's "
                         f"pictures in prompt order.")
    height, width = (int(x) for x in shapes[image])
    if min(height, width) < 32 and max(height / width, width / height) > 4:
        raise ValueError(f"row {b}'s step3p7 picture {image} ({height} x {width}) is one its processor pads to a "
                         f"square before cutting it: its token grids are not placed on it.")


def _granite_docling_row(config: Any, b: int, runs: Sequence[tuple[int, int]], names: Sequence[tuple[str, str]],
                         side: int) -> list[TokenGrid]:
    """Granite-Docling: <row_i_col_j> tiles, then a <global-img> run when there are several; a lone tile (after
    <row_1_col_1>, with no global run) is the whole image. Tiles of the fine path have twice the side."""
    sides = {side * side: side}
    if getattr(config.vision_config, "use_fine_route", False):
        sides[4 * side * side] = 2 * side
    grids: list[TokenGrid] = []
    tile_runs: list[tuple[int, str]] = []
    length_of = dict(runs)  # first image-token index -> run length

    def whole_image(start: int) -> None:
        grids.append(TokenGrid(len({g.image for g in grids}), "patches", _square(sides[length_of[start]], start)))

    for (start, length), (name, _) in zip(runs, names):
        if length not in sides:
            raise ValueError(f"row {b} has a run of {length} granite_docling image tokens, not one square tile of "
                             f"{' or '.join(f'{n} x {n}' for n in sides.values())}.")
        if name == "<global-img>":
            if not tile_runs:
                raise ValueError(f"row {b}: a granite_docling global image follows no tiles.")
            image = len({g.image for g in grids})
            grids.extend(_idefics_tiles(image, tile_runs, sides[length], b))
            grids.append(TokenGrid(image, "global", _square(sides[length], start)))
            tile_runs = []
            continue
        if name == "<row_1_col_1>" and tile_runs:  # the pending image was one tile, with no global image
            if len(tile_runs) > 1:
                raise ValueError(f"row {b}'s granite_docling image has {len(tile_runs)} tiles but no global image "
                                 f"run.")
            whole_image(tile_runs[0][0])
            tile_runs = []
        tile_runs.append((start, name))
    if len(tile_runs) > 1:
        raise ValueError(f"row {b}'s last granite_docling image has {len(tile_runs)} tiles but no global image run.")
    if tile_runs:
        whole_image(tile_runs[0][0])
    return grids


def _idefics_tiles(image: int, tile_runs: Sequence[tuple[int, str]], side: int, b: int) -> list[TokenGrid]:
    places = []
    for start, name in tile_runs:
        found = re.fullmatch(r"<row_(\d+)_col_(\d+)>", name)
        if found is None:
            raise ValueError(f"row {b}: an Idefics3 tile run follows {name!r}, not a <row_i_col_j> token.")
        places.append((int(found[1]) - 1, int(found[2]) - 1, start))
    rows, cols = max(p[0] for p in places) + 1, max(p[1] for p in places) + 1
    tokens = np.full((rows * side, cols * side), -1)
    for r, c, start in places:
        tokens[r * side : (r + 1) * side, c * side : (c + 1) * side] = _square(side, start)
    return [TokenGrid(image, "tiles", tokens)]


def _token_names(before: Sequence[Sequence[int]] | None, tokenizer: Any, b: int, family: str
                 ) -> list[tuple[str, str]]:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if before is None or tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise ValueError(f"{family}'s image tokens are placed by the token before each run (its tile names): "
                         f"decode with session.generate inside vlmfix.apply(..., tokenizer=processor), which "
                         f"records them, and keep the tokenizer (row {b}).")
    def name(i: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(i))) if i >= 0 else ""

    return [(name(pair[0]), name(pair[1])) for pair in before]


def _shape_of(shapes: Sequence[Sequence[int]] | None, image: int, b: int, family: str) -> tuple[int, int]:
    if shapes is None or image >= len(shapes):
        raise ValueError(f"row {b}'s {family} image {image} is cut into tiles, whose canvas depends on the picture's "
                         f"size: pass the row's pictures, session.plot(row, images=[...]).")
    return int(shapes[image][0]), int(shapes[image][1])


def row_layouts(family: str, config: Any, tokens_per_row: Sequence[int], *, image_sizes: Any = None,
                image_grid_thw: Any = None, image_patch_grids: Any = None,
                image_merge_sizes: Any = None, rows_per_prompt: int = 1,
                image_positions: Sequence[Sequence[int]] | None = None,
                image_run_tokens: Sequence[Sequence[Sequence[int]]] | None = None, tokenizer: Any = None,
                image_shapes: Mapping[int, Sequence[Sequence[int]]] | None = None,
                rows: Collection[int] | None = None) -> list[RowLayout]:
    """Each row's image tokens on their images' grids.

    Args:
        family: the adapter's family (`GRID_FAMILIES`; those of `REFUSED` raise, naming why; others: one square
            grid per row when its token count is a square).
        config: the model's config (vision tower sizes, AnyRes pinpoints, merge size).
        tokens_per_row: image tokens of each batch row.
        image_sizes: [images, 2] (height, width) of every image, LLaVA-NeXT / OneVision / Mistral 3.
        image_grid_thw: [images, 3] patch grid of every image, Qwen / GLM.
        image_patch_grids: [images, 2] patch rows and cols of every image (before pooling), Gemma 4.
        image_merge_sizes: [images] merge size of every image, VideoLLaMA 3.
        rows_per_prompt: batch rows per prompt (beams, return sequences): the image inputs list the images of
            each prompt once.
        image_positions: each row's image-token positions (runs of consecutive ones are tiles or images of
            InternVL, Aya Vision, Idefics3 / SmolVLM); default: one run per row.
        image_run_tokens: each row's [before, after] token ids of each run (`session.prompt_record()`), Aya
            Vision / Command A Vision / Idefics3.
        tokenizer: names those tokens.
        image_shapes: {row: [(height, width) of each picture]}: the tile canvas of InternVL / Aya Vision /
            Command A Vision.
        rows: the rows to lay out (None: all); the others of a run family stay without grids.
    """
    if family in REFUSED:
        raise ValueError(f"vlmfix.viz cannot place {family}'s image tokens on its images: {REFUSED[family]}. The "
                         f"pictures support {', '.join(GRID_FAMILIES)}.")
    sizes = _as_rows(image_sizes)
    thw = _as_rows(image_grid_thw)
    patch_grids = _as_rows(image_patch_grids)
    merges = None if image_merge_sizes is None else [[m] for m in _flat(image_merge_sizes)]  # [images, 1]
    layouts: list[RowLayout] = []
    next_image = 0
    for b, count in enumerate(tokens_per_row):
        if b % rows_per_prompt:
            layouts.append(layouts[-1])
            continue
        layout = RowLayout(count=int(count))
        if family in RUN_FAMILIES and rows is not None and b not in rows:
            layouts.append(layout)
            continue
        if family in RUN_FAMILIES:
            positions = list(image_positions[b]) if image_positions is not None else list(range(int(count)))
            before = image_run_tokens[b] if image_run_tokens is not None else None
            shapes = (image_shapes or {}).get(b)
            layout.grids.extend(_run_family_row(family, config, b, positions, before, tokenizer, shapes))
            layouts.append(layout)
            continue
        used, image = 0, 0
        while used < count:
            if family in SQUARE_FAMILIES:
                grids, unplaced, n = _llava_image(config, image, used)
                layout.unplaced.extend(unplaced)
            elif family in LETTERBOX_FAMILIES:
                side = _vision_side(config)
                grids, n = [TokenGrid(image, "patches", _square(side, used), letterbox=True)], side * side
            elif family in ANYRES_FAMILIES:
                max_tiles = _onevision_max_tiles(config) if family == "llava_onevision" else None
                grids, newlines, n = _llava_next_image(config, image, used, _take(sizes, next_image, "image_sizes"),
                                                       max_tiles)
                layout.newlines.update(newlines)
            elif family in PIXTRAL_FAMILIES:
                grids, n = _cells_image(image, used, _take(sizes, next_image, "image_sizes"),
                                        int(config.vision_config.patch_size) * int(config.spatial_merge_size),
                                        "merged")
            elif family in VQ_FAMILIES:
                grids, n = _cells_image(image, used, _take(sizes, next_image, "image_sizes"),
                                        int(config.vision_config.spatial_scale_factor), "codes")
            elif family in MERGED_FAMILIES:
                grids, n = _qwen_image(config, image, used, _take(thw, next_image, "image_grid_thw"))
            elif family in NEWLINE_MERGED_FAMILIES:
                grids, newlines, unplaced, n = _newline_merged_image(family, config, image, used,
                                                                     _take(thw, next_image, "image_grid_thw"))
                layout.newlines.update(newlines)
                layout.unplaced.extend(unplaced)
            elif family in PER_IMAGE_MERGE_FAMILIES:
                merge = _take(merges, next_image, "image_merge_sizes")[0]
                grids, n = _qwen_image(config, image, used, _take(thw, next_image, "image_grid_thw"), merge)
            elif family in POOLED_FAMILIES:
                # Gemma 4 Unified's positions are its model patches' (the processor merged the k x k blocks)
                grids, n = _cells_image(image, used, _take(patch_grids, next_image, "image_patch_grids"),
                                        1 if family == "gemma4_unified" else
                                        int(config.vision_config.pooling_kernel_size), "pooled")
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
                             f"image inputs (image_sizes / image_grid_thw / image_patch_grids) of the same call.")
        layouts.append(layout)
    return layouts


def _as_rows(value: Any) -> list[list[int]] | None:
    if value is None:
        return None
    return [[int(x) for x in row] for row in (value.tolist() if hasattr(value, "tolist") else value)]


def _flat(value: Any) -> list[int]:
    return [int(x) for x in (value.tolist() if hasattr(value, "tolist") else value)]


def _take(rows: list[list[int]] | None, index: int, name: str) -> list[int]:
    if rows is None or index >= len(rows):
        have = 0 if rows is None else len(rows)
        raise ValueError(f"the prompt's image tokens need {name} for image {index}, but {have} were recorded; "
                         f"decode with session.generate(**inputs), which records them, or pass the processor's output "
                         f"to the picture: session.plot(row, inputs=inputs).")
    return rows[index]
