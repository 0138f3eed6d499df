"""The token -> patch grids of `vlmfix.viz.patches`, checked against what the processors and models really do.

Each test feeds "coordinate pictures" (red = x, green = y of every pixel, blue = 1 on the picture) through the
family's own processor, reads back which part of the picture each image token's pixels came from, and checks
that the grid puts the token there. LLaVA-NeXT is also checked token by token against the model's own
`pack_image_features` (base view, tiles, unpadding, newline tokens). Two rows, two pictures each, of
different non-square sizes.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tests.conftest import tiny_model
from vlmfix.viz.patches import row_layouts

SIZES = [(40, 64), (72, 48), (56, 88), (64, 40)]  # (height, width) of the four pictures, row by row


def coordinate_picture(height: int, width: int) -> Image.Image:
    """Red = (x + 0.5) / width, green = (y + 0.5) / height, blue = 1 (padding added by a processor is not)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x + 0.5) / width, (y + 0.5) / height, np.ones_like(x, dtype=float)], axis=-1)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def build(family: str) -> tuple:
    tiny = tiny_model(family)
    if family == "cohere_compass":  # the tiny build reuses Qwen2-VL's image processor; check the family's own
        from transformers.models.cohere_compass.image_processing_pil_cohere_compass import (
            CohereCompassImageProcessorPil,
        )

        tiny.processor.image_processor = CohereCompassImageProcessorPil(
            min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2)
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    layouts = row_layouts(family, tiny.model.config, image.sum(1).tolist(), image_sizes=inputs.get("image_sizes"),
                          image_grid_thw=inputs.get("image_grid_thw"))
    return tiny, inputs, layouts


def unnormalised(processor, pixels: torch.Tensor) -> torch.Tensor:
    """[3, ...] pixel values back to [0, 1] colours."""
    mean = torch.tensor(processor.image_processor.image_mean).view(3, *[1] * (pixels.dim() - 1))
    std = torch.tensor(processor.image_processor.image_std).view(3, *[1] * (pixels.dim() - 1))
    return pixels.float() * std + mean


def cell_centres(rows: int, cols: int, top: float = 0.0, left: float = 0.0, height: float = 1.0,
                 width: float = 1.0) -> np.ndarray:
    """[rows, cols, 2] (x, y) centres of a grid over the region, as fractions of the picture."""
    y, x = np.mgrid[0:rows, 0:cols]
    return np.stack([left + (x + 0.5) / cols * width, top + (y + 0.5) / rows * height], axis=-1)


@pytest.mark.parametrize("family", ["llava", "vipllava", "video_llava"])
def test_llava_square_grid_over_the_centre_crop(family: str):
    tiny, inputs, layouts = build(family)
    pixels = inputs["pixel_values"]  # [images, 3, S, S]: resized short side, centre crop
    if family == "video_llava":  # the tiny build's CLIP image processor makes the family's own pixels
        from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

        own = VideoLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        pictures = [coordinate_picture(h, w) for h, w in SIZES]
        torch.testing.assert_close(own(images=pictures, return_tensors="pt")["pixel_values_images"], pixels)
    side = tiny.model.config.vision_config.image_size // tiny.model.config.vision_config.patch_size
    patch = tiny.model.config.vision_config.patch_size
    for b, layout in enumerate(layouts):
        assert layout.count == 2 * side * side and layout.unplaced == []
        for grid in layout.grids:
            index = 2 * b + grid.image
            height, width = SIZES[index]
            top, left, crop_h, crop_w = grid.crop(height, width)
            colours = unnormalised(tiny.processor, pixels[index])
            # CLIP patches are row-major over the crop: token k of this image sees patch (k // side, k % side)
            first = grid.image * side * side
            for (r, c), token in np.ndenumerate(grid.tokens):
                k = token - first
                seen = colours[:2, (k // side) * patch : (k // side + 1) * patch, (k % side) * patch :
                               (k % side + 1) * patch].mean((1, 2)).numpy()
                expected = cell_centres(side, side, top / height, left / width, crop_h / height,
                                        crop_w / width)[r, c]
                assert np.allclose(seen, expected, atol=0.5 / side), (b, grid.image, r, c)


@pytest.mark.parametrize("family", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_deepseek_vl_square_grid_over_the_padded_square(family: str):
    """DeepSeek-VL resizes the long side and pads the short one to a centred square: token k sees SigLIP patch
    (k // side, k % side) of that square, so the cells past the picture's short side see only padding. The hybrid
    adds a high-resolution view (SAM, its output flattened row-major) of the same padded square to each token."""
    tiny, inputs, layouts = build(family)
    side = tiny.model.config.vision_config.image_size // tiny.model.config.vision_config.patch_size
    processor = tiny.processor.image_processor
    views = [(processor.image_mean, processor.image_std, inputs["pixel_values"])]  # pixels: [images, 3, S, S]
    if family == "deepseek_vl_hybrid":
        views.append((processor.high_res_image_mean, processor.high_res_image_std, inputs["high_res_pixel_values"]))
    padding_cells = 0
    for mean, std, pixels in views:
        patch = pixels.shape[-1] // side  # pixels of one token's cell in this view
        for b, layout in enumerate(layouts):
            assert layout.count == 2 * side * side
            for grid in layout.grids:
                index = 2 * b + grid.image
                height, width = SIZES[index]
                square = max(height, width)
                # the padded square in picture fractions: it starts (square - side) / 2 before the picture's edge
                centres = cell_centres(side, side, -(square - height) / 2 / height, -(square - width) / 2 / width,
                                       square / height, square / width)
                left, right, bottom, top = grid.extent(height, width)
                assert (right - left, bottom - top) == (square, square)
                assert (left + right, top + bottom) == (width, height)
                colours = pixels[index].float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
                first = grid.image * side * side
                for (r, c), token in np.ndenumerate(grid.tokens):
                    k = token - first
                    block = colours[:, (k // side) * patch : (k // side + 1) * patch,
                                    (k % side) * patch : (k % side + 1) * patch]
                    on_picture = block[2] > 0.9  # the padding is the processor's background (the mean colour)
                    if on_picture.float().mean() < 0.5:
                        padding_cells += 1
                        continue
                    seen = np.array([block[0][on_picture].mean(), block[1][on_picture].mean()])
                    assert np.allclose(seen, centres[r, c], atol=0.5 / side + 0.02), (b, grid.image, r, c)
    assert padding_cells > 0  # the pictures are not square: some cells lie on the padding


@pytest.mark.parametrize("family", ["llava_next", "llava_next_video", "granite4_vision"])
def test_llava_next_base_tiles_and_newlines_match_pack_image_features(family: str):
    """Granite 4 Vision: its own pack_image_features over views shrunk by its downsample_rate (1/2 here: a token's
    cell is 2 x 2 patches)."""
    tiny, inputs, layouts = build(family)
    config = tiny.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    if family == "granite4_vision":
        side = int(side * Fraction(config.downsample_rate))
    patch = config.vision_config.image_size // side  # pixels of a token's cell
    sizes = inputs["image_sizes"]
    # the model's own packing, on features that name their (view, y, x); the newline is (-1, -1, -1)
    features = []
    for size in sizes:
        views = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        v, y, x = torch.meshgrid(torch.arange(views), torch.arange(side), torch.arange(side), indexing="ij")
        features.append(torch.stack([v, y, x], -1).reshape(views, side * side, 3).float())
    result = tiny.model.model.pack_image_features(features, sizes, "default", image_newline=torch.full((3,), -1.0))
    if isinstance(result, list):  # Granite 4 Vision: each image's tokens
        per_image = result
    else:  # LLaVA-NeXT: (the tokens, each image's count)
        packed, lengths = result
        per_image = packed if isinstance(packed, (list, tuple)) else torch.split(packed, list(lengths))
    for b, layout in enumerate(layouts):
        names = torch.cat([per_image[2 * b], per_image[2 * b + 1]]).long()  # [row's image tokens, 3]
        assert layout.count == names.shape[0]
        newline = (names == -1).all(-1)
        mine = np.zeros(layout.count, dtype=bool)
        for tokens in layout.newlines.values():
            mine[tokens] = True
        assert (torch.from_numpy(mine) == newline).all()
        for grid in layout.grids:
            index = 2 * b + grid.image
            view_of = names[torch.from_numpy(grid.tokens.reshape(-1))]  # [cells, 3]
            if grid.kind == "base":
                assert (view_of[:, 0] == 0).all()
                expected = torch.from_numpy(np.stack(np.mgrid[0:side, 0:side], -1).reshape(-1, 2))
                assert (view_of[:, 1:] == expected).all()
                continue
            # tiles: the grid is the tiles' joint canvas cut to a window (one offset for every cell)
            h, w = sizes[index].tolist()
            canvas_h, canvas_w = select_best_resolution((h, w), config.image_grid_pinpoints)
            tiles_across = canvas_w // config.vision_config.image_size
            tile = view_of[:, 0] - 1
            canvas_y = tile // tiles_across * side + view_of[:, 1]
            canvas_x = tile % tiles_across * side + view_of[:, 2]
            rows, cols = grid.shape
            cell_y, cell_x = (torch.from_numpy(a.reshape(-1)) for a in np.mgrid[0:rows, 0:cols])
            assert len(set((canvas_y - cell_y).tolist())) == 1 and len(set((canvas_x - cell_x).tolist())) == 1
            # and the window is the picture: each cell's pixels come from the cell's part of the picture
            colours = unnormalised(tiny.processor, inputs["pixel_values"][index].transpose(0, 1))  # [3, views, S, S]
            centres = cell_centres(rows, cols).reshape(-1, 2)
            for cell in range(rows * cols):
                view, y, x = view_of[cell].tolist()
                block = colours[:, view, y * patch : (y + 1) * patch, x * patch : (x + 1) * patch]
                on_picture = block[2] > 0.9
                if on_picture.float().mean() < 0.5:  # a border cell that is mostly padding
                    continue
                seen = np.array([block[0][on_picture].mean(), block[1][on_picture].mean()])
                assert np.allclose(seen, centres[cell], atol=1.0 / min(rows, cols)), (b, grid.image, cell)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe",
                                    "glm46v", "glm_ocr", "exaone4_5", "qwen2_5_omni_thinker", "ernie4_5_vl_moe",
                                    "hyperclovax_vision_v2", "cosmos3_edge", "cohere_compass",
                                    "llava_onevision1_5"])
def test_qwen_merged_patches(family: str):
    tiny, inputs, layouts = build(family)
    merge = tiny.model.config.vision_config.spatial_merge_size
    thw = inputs["image_grid_thw"]
    # the processor's patch rows: each merged token is `merge`^2 consecutive rows [3 * t * p * p]
    patches = inputs["pixel_values"].view(inputs["pixel_values"].shape[0], 3, -1)
    if family == "cosmos3_edge":  # its rows hold each patch's values pixel-major, channel last ([p, p, 3, t])
        patch = tiny.model.config.vision_config.patch_size
        patches = inputs["pixel_values"].view(len(patches), patch * patch, 3, -1).transpose(1, 2).flatten(2)
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), thw.prod(-1)]), 0)
    for b, layout in enumerate(layouts):
        assert layout.count == sum(int(thw[2 * b + k].prod()) // merge**2 for k in range(2))
        first_token = 0
        for grid in layout.grids:
            index = 2 * b + grid.image
            t, h, w = thw[index].tolist()
            assert grid.shape == (h // merge, w // merge)
            rows = patches[starts[index] : starts[index + 1]]  # this picture's patch rows
            colours = unnormalised(tiny.processor, rows.transpose(0, 1))  # [3, patches, values]
            centres = cell_centres(*grid.shape)
            for (r, c), token in np.ndenumerate(grid.tokens):
                k = token - first_token
                seen = colours[:2, k * merge**2 : (k + 1) * merge**2].mean((1, 2)).numpy()
                assert np.allclose(seen, centres[r, c], atol=0.5 / min(grid.shape)), (b, grid.image, r, c)
            first_token += grid.tokens.size


def test_count_mismatch_is_named():
    tiny, inputs, _ = build("qwen2_vl")
    with pytest.raises(ValueError, match="image_grid_thw"):
        row_layouts("qwen2_vl", tiny.model.config, [10_000], image_grid_thw=inputs["image_grid_thw"][:1])
