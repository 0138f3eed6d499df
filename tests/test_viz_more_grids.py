"""The token -> patch grids of the families mapped after the first ones (Gemma 4, ...), checked as
tests/test_viz_grids.py checks the others: coordinate pictures (red = x, green = y, blue = 1 on the picture) go
through the family's processor, each vision patch's mean colour goes through the model's own token-forming module
(Gemma 4's pooler, ...), so each image token carries the (x, y) of the part of the picture it sees, and the grid of
`vlmfix.viz.patches` must put the token there. Two rows, two pictures each, of different non-square sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_viz_grids import build
from tests.test_viz_patches import SIZES, cell_centres
from vlmfix.decoding.prompt_inputs import patch_grids
from vlmfix.viz.patches import row_layouts


def gemma4_token_colours(tiny, inputs) -> torch.Tensor:
    """[image tokens, 3] (x * w, y * w, w) of every image token of the batch, in prompt order, through the vision
    tower's own pooler (w: the token's share of picture pixels; the pooler's scale cancels in x * w / w)."""
    pixels = inputs["pixel_values"]  # [images, patches, p * p * 3]: each patch's pixels, channel last
    positions = inputs["image_position_ids"]  # [images, patches, 2]: (x, y), (-1, -1) on padding
    images, patches, _ = pixels.shape
    colours = pixels.float().reshape(images, patches, -1, 3).mean(2)  # [images, patches, 3]: rescaled to [0, 1]
    on_picture = (pixels.float().reshape(images, patches, -1, 3)[..., 2] > 0.9).float().mean(-1)
    weighted = torch.stack([colours[..., 0] * on_picture, colours[..., 1] * on_picture, on_picture], -1)
    padding = (positions == -1).all(-1)
    kernel = tiny.model.config.vision_config.pooling_kernel_size
    with torch.no_grad():
        pooled, kept = tiny.model.model.vision_tower.pooler(weighted, positions, padding, patches // kernel**2)
    return pooled[kept]  # the tower strips the padding tokens the same way


def check_tokens_on_grids(layouts, colours: list[np.ndarray]) -> None:
    """Every image token lies on one grid cell whose centre is where its pixels come from."""
    for b, layout in enumerate(layouts):
        seen = colours[b]
        placed = np.zeros(layout.count, dtype=int)
        assert len({g.image for g in layout.grids}) == 2
        for grid in layout.grids:
            centres = cell_centres(*grid.shape)
            for (r, c), token in np.ndenumerate(grid.tokens):
                if token < 0:
                    continue
                placed[token] += 1
                if seen[token, 2] < 0.5:  # mostly padding
                    continue
                where = seen[token, :2] / seen[token, 2]
                assert np.allclose(where, centres[r, c], atol=0.5 / min(grid.shape) + 0.02), \
                    (b, grid.image, grid.kind, r, c, where, centres[r, c])
        newline = np.zeros(layout.count, dtype=int)
        for tokens in layout.newlines.values():
            newline[tokens] += 1
        assert ((placed + newline) == 1).all()  # each token once: on a grid or a newline


def test_gemma4_pooled_patches():
    tiny, inputs = build("gemma4")
    config = tiny.model.config
    image = inputs["input_ids"] == config.image_token_id
    counts = image.sum(1).tolist()
    layouts = row_layouts("gemma4", config, counts, image_patch_grids=patch_grids(inputs["image_position_ids"]))
    flat = gemma4_token_colours(tiny, inputs).numpy()
    assert len(flat) == sum(counts)
    colours = np.split(flat, np.cumsum(counts)[:-1])
    for b, layout in enumerate(layouts):
        for grid in layout.grids:
            height, width = SIZES[2 * b + grid.image]
            rows, cols = grid.shape
            assert rows != cols and (rows < cols) == (height < width)  # the picture's aspect ratio, not a square
    check_tokens_on_grids(layouts, colours)


def test_gemma4_needs_its_patch_grids():
    tiny, inputs = build("gemma4")
    count = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).sum())
    with pytest.raises(ValueError, match="image_patch_grids"):
        row_layouts("gemma4", tiny.model.config, [count])
