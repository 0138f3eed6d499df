"""The token -> patch grids of the newer families, checked against the processors and the models' own feature paths.

Coordinate pictures (red = x, green = y of every pixel, see tests/test_viz_patches.py) go through each family's
processor; each vision patch's mean colour then goes through the model's own token-forming step (pixel shuffle,
patch merger, pooling, AnyRes packing), read from the real module, so every image token carries the (x, y) of
the part of the picture it sees. The grid of `vlmfix.viz.patches` must put each token at that place. Two rows,
two pictures each, of different non-square sizes; variants cut the pictures into Idefics3 tiles (`_split`) and
shrink OneVision's tiles (`_max1`: anyres_max_1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tests.conftest import tiny_model
from tests.test_viz_patches import SIZES, cell_centres, coordinate_picture, unnormalised
from vlmfix.viz.patches import row_layouts


def build(family: str):
    tiny = tiny_model(family.removesuffix("_split").removesuffix("_max1"))
    if family.endswith("_max1"):  # OneVision's anyres_max_1: tiles beyond one tile's tokens shrink (interpolated)
        tiny.model.config.vision_aspect_ratio = tiny.processor.vision_aspect_ratio = "anyres_max_1"
    if family.endswith("_split"):  # Idefics3 cutting each picture into 32-pixel tiles named <row_i_col_j>
        tiny.processor.image_processor.do_image_splitting = True
        tiny.processor.image_processor.size = {"longest_edge": 64}
        tiny.processor.tokenizer.add_tokens([f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)],
                                            special_tokens=True)
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    images = [pictures[:2], pictures[2:]] if tiny.nested_images else pictures
    inputs = tiny.processor(text=prompts, images=images, padding=True, return_tensors="pt")
    return tiny, inputs


def patch_colours(tiny, pixels: torch.Tensor) -> torch.Tensor:
    """[views, 3, S, S] pixel values -> [views, (S / p)^2, 3] each vision patch's (x * w, y * w, w), row-major: w is
    its share of picture pixels (not padding), x and y their mean colour (averaging ops keep the products)."""
    patch = tiny.model.config.vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    colours = unnormalised(tiny.processor, pixels.transpose(0, 1))  # [3, views, S, S]
    on_picture = (colours[2] > 0.9).float()
    weighted = torch.stack([colours[0] * on_picture, colours[1] * on_picture, on_picture])
    three, views, height, width = weighted.shape
    blocks = weighted.reshape(3, views, height // patch, patch, width // patch, patch).mean((3, 5))
    return blocks.permute(1, 2, 3, 0).reshape(views, -1, 3).contiguous()


def grouped(features: torch.Tensor, channels: int) -> torch.Tensor:
    """[..., groups * channels] merged features (channel fastest) -> [..., 3]: the mean over the groups."""
    split = features.reshape(*features.shape[:-1], -1, channels)
    return split[..., :3].mean(-2)


def padded(colours: torch.Tensor, width: int) -> torch.Tensor:
    """The 3 channels first of `width` (a module that needs its real hidden size)."""
    return torch.cat([colours, colours.new_zeros(*colours.shape[:-1], width - 3)], -1)


def token_colours(family: str, tiny, inputs) -> list[np.ndarray]:
    """Per row: [image tokens, 3] (x * w, y * w, w) of the picture each token sees (w: its share of picture
    pixels), in prompt order; NaN for newline tokens."""
    config, inner = tiny.model.config, tiny.model.model
    pixels = inputs["pixel_values"]
    family = family.removesuffix("_split").removesuffix("_max1")
    if family in ("idefics3", "smolvlm"):
        real = inputs["pixel_attention_mask"].flatten(0, 1).any(-1).any(-1)
        views = patch_colours(tiny, pixels.flatten(0, 1)[real])
        tokens = grouped(inner.connector.pixel_shuffle(views, config.scale_factor), 3)
    elif family in ("internvl", "qianfan_ocr"):
        views = patch_colours(tiny, pixels)
        side = int(views.shape[1] ** 0.5)
        tokens = grouped(inner.pixel_shuffle(views.reshape(-1, side, side, 3), config.downsample_ratio), 3)
        tokens = tokens.flatten(1, 2)
    elif family == "aya_vision":
        tokens = grouped(inner.multi_modal_projector.pixel_shuffle(patch_colours(tiny, pixels)), 3).flatten(1, 2)
    elif family == "paligemma":
        tokens = patch_colours(tiny, pixels)
    elif family == "gemma3":
        seen = {}
        hook = inner.multi_modal_projector.mm_soft_emb_norm.register_forward_pre_hook(
            lambda module, args: seen.update(pooled=args[0][..., :3].clone()))
        with torch.no_grad():
            inner.multi_modal_projector(padded(patch_colours(tiny, pixels), config.vision_config.hidden_size))
        hook.remove()
        tokens = seen["pooled"]
    elif family in ("mistral3", "mistral_large4", "lighton_ocr"):
        sizes = inputs["image_sizes"]
        patch = config.vision_config.patch_size
        per_image = [patch_colours(tiny, pixels[k : k + 1])[0].reshape(pixels.shape[-2] // patch, -1, 3)
                     [: int(h) // patch, : int(w) // patch].reshape(-1, 3) for k, (h, w) in enumerate(sizes.tolist())]
        merger = (inner.vision_projection if family == "lighton_ocr" else inner.multi_modal_projector).patch_merger
        seen = {}
        hook = merger.merging_layer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].clone()))
        with torch.no_grad():
            merger(padded(torch.cat(per_image), config.vision_config.hidden_size), sizes)
        hook.remove()
        hidden = config.vision_config.hidden_size
        merged = seen["x"].reshape(-1, hidden, config.spatial_merge_size**2)  # unfold: channel slowest
        tokens = merged[:, :3].mean(-1)[None]
    elif family == "llava_onevision":
        side = config.vision_config.image_size // config.vision_config.patch_size
        features = []
        for k, size in enumerate(inputs["image_sizes"]):
            views = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            features.append(patch_colours(tiny, pixels[k, :views]))
        packed, _ = inner.pack_image_features(features, inputs["image_sizes"], torch.full((3,), float("nan")),
                                              config.vision_aspect_ratio)
        tokens = torch.cat(list(packed))[None]
    else:
        raise AssertionError(family)
    flat = tokens.reshape(-1, 3).numpy()
    counts = (inputs["input_ids"] == config.image_token_id).sum(1).tolist()
    assert sum(counts) == len(flat)
    return list(np.split(flat, np.cumsum(counts)[:-1]))


def check_tokens_on_grids(layouts, colours: list[np.ndarray], images: tuple[int, ...] = (2, 2),
                          sizes: list | None = None) -> None:
    """Every image token lies on one grid cell whose centre is where its pixels come from (`images` per row; with
    the pictures' (height, width) in `sizes`, the cells lie over each grid's `extent` of its picture, else over the
    whole picture)."""
    for b, layout in enumerate(layouts):
        seen = colours[b]
        placed = np.zeros(layout.count, dtype=int)
        assert len({g.image for g in layout.grids}) == images[b]
        for grid in layout.grids:
            centres = cell_centres(*grid.shape)
            if sizes is not None:
                height, width = sizes[sum(images[:b]) + grid.image]
                left, right, bottom, top = grid.extent(height, width)
                centres = cell_centres(*grid.shape, top / height, left / width, (bottom - top) / height,
                                       (right - left) / width)
            for (r, c), token in np.ndenumerate(grid.tokens):
                if token < 0:
                    continue
                placed[token] += 1
                if seen[token, 2] < 0.5:  # mostly padding (a letterboxed border cell, say)
                    continue
                where = seen[token, :2] / seen[token, 2]
                assert np.allclose(where, centres[r, c], atol=0.5 / min(grid.shape) + 0.02), \
                    (b, grid.image, grid.kind, r, c, where, centres[r, c])
        newline = np.zeros(layout.count, dtype=int)
        for tokens in layout.newlines.values():
            newline[tokens] += 1
        assert np.array_equal(newline > 0, np.isnan(seen).any(-1))  # the model's newline tokens, and only those
        unplaced = np.zeros(layout.count, dtype=int)
        unplaced[layout.unplaced] += 1
        assert ((placed + newline + unplaced) == 1).all()  # each token once: on a grid, a newline or unplaced


def run_layouts(family: str, tiny, inputs, sizes: list = SIZES):
    """`row_layouts` of a family placed by its image-token runs, from the processor's ids (as the session records
    them) and the pictures' sizes (two a row)."""
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    positions = [row.nonzero().flatten().tolist() for row in image]
    around = []  # per row: [token before, token after] each run
    for ids, mask in zip(inputs["input_ids"].tolist(), image.tolist()):
        starts = [p for p in range(len(ids)) if mask[p] and (p == 0 or not mask[p - 1])]
        ends = [p for p in range(len(ids)) if mask[p] and (p + 1 == len(ids) or not mask[p + 1])]
        around.append([[ids[s - 1], ids[e + 1]] for s, e in zip(starts, ends)])
    return row_layouts(family, tiny.model.config, image.sum(1).tolist(), image_positions=positions,
                       image_run_tokens=around, tokenizer=tiny.processor,
                       image_shapes={b: sizes[2 * b : 2 * b + 2] for b in range(2)})


def split_by_row(flat: np.ndarray, inputs, image_token_id: int) -> list[np.ndarray]:
    counts = (inputs["input_ids"] == image_token_id).sum(1).tolist()
    assert len(flat) == sum(counts)
    return np.split(flat, np.cumsum(counts)[:-1])


FAMILIES = ["llava_onevision", "mistral3", "mistral_large4", "lighton_ocr", "paligemma", "gemma3", "internvl",
            "qianfan_ocr", "aya_vision", "idefics3", "smolvlm", "idefics3_split", "llava_onevision_max1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_places_each_token_where_its_pixels_come_from(family: str):
    tiny, inputs = build(family)
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    positions = [row.nonzero().flatten().tolist() for row in image]
    tokens_before_after = []
    for ids, mask in zip(inputs["input_ids"].tolist(), image):
        starts = [p for p in mask.nonzero().flatten().tolist() if p == 0 or not mask[p - 1]]
        ends = [p for p in mask.nonzero().flatten().tolist() if p + 1 == len(ids) or not mask[p + 1]]
        tokens_before_after.append([[ids[s - 1], ids[e + 1]] for s, e in zip(starts, ends)])
    shapes = {b: SIZES[2 * b : 2 * b + 2] for b in range(2)}
    layouts = row_layouts(family.removesuffix("_split").removesuffix("_max1"), tiny.model.config, image.sum(1).tolist(),
                          image_sizes=inputs.get("image_sizes"),
                          image_positions=positions, image_run_tokens=tokens_before_after,
                          tokenizer=tiny.processor, image_shapes=shapes)
    colours = token_colours(family, tiny, inputs)
    kinds = {g.kind for layout in layouts for g in layout.grids}
    if family in ("llava_onevision", "llava_onevision_max1", "internvl", "qianfan_ocr", "aya_vision", "idefics3_split"):
        assert "tiles" in kinds, kinds  # the pictures are cut into tiles
    assert all(not layout.unplaced for layout in layouts)  # every token on a grid or a newline
    check_tokens_on_grids(layouts, colours)


def test_gemma3_pan_and_scan_crops_are_refused_with_the_pictures():
    tiny, inputs = build("gemma3")
    count = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).sum())
    with pytest.raises(ValueError, match="pan-and-scan"):  # 2 views shown as 3 pictures: crops cannot be placed
        row_layouts("gemma3", tiny.model.config, [count], image_shapes={0: SIZES[:3]})


def test_tiles_need_the_pictures_and_the_tile_names():
    tiny, inputs = build("internvl")
    count = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).sum())
    with pytest.raises(ValueError, match="images="):
        row_layouts("internvl", tiny.model.config, [count])
    with pytest.raises(ValueError, match="tokenizer"):
        row_layouts("idefics3", tiny_model("idefics3").model.config, [4])
