"""The token -> patch grids of the families mapped after the first ones (Gemma 4, ...), checked as
tests/test_viz_grids.py checks the others: coordinate pictures (red = x, green = y, blue = 1 on the picture) go
through the family's processor, each vision patch's mean colour goes through the model's own token-forming module
(Gemma 4's pooler, ...), so each image token carries the (x, y) of the part of the picture it sees, and the grid of
`vlmfix.viz.patches` must put the token there. Two rows, two pictures each, of different non-square sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from tests.test_viz_grids import build, check_tokens_on_grids, grouped, padded, patch_colours, run_layouts, split_by_row
from tests.test_viz_patches import SIZES, coordinate_picture, unnormalised
from vlmfix.decoding.prompt_inputs import patch_grids
from vlmfix.viz.patches import TokenGrid, perception_canvas, row_layouts, scale_canvas


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


def flat_patch_colours(tiny, inputs) -> torch.Tensor:
    """Flat [patches, 3 * n] pixel values (each patch's channels slowest: n = t * p * p, or p * p) -> [patches, 3]
    each patch's mean colour (x, y, 1)."""
    patches = inputs["pixel_values"].view(len(inputs["pixel_values"]), 3, -1)  # [patches, 3, n]
    return unnormalised(tiny.processor, patches.transpose(0, 1)).mean(-1).T


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


@pytest.mark.torchvision
def test_cohere2_vision_tiles_then_thumbnail():
    """Command A Vision's own image processor (torchvision) cuts each picture into up to 6 tiles of 32 pixels and
    adds a thumbnail; the projector's own pixel shuffle makes each tile's 2 x 2 tokens."""
    from transformers.models.cohere2_vision.image_processing_cohere2_vision import Cohere2VisionImageProcessor

    tiny, _ = build("cohere2_vision")
    tiny.processor.image_processor = Cohere2VisionImageProcessor(size={"height": 32, "width": 32}, max_patches=6,
                                                                 patch_size=2)
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    layouts = run_layouts("cohere2_vision", tiny, inputs)
    assert {g.kind for layout in layouts for g in layout.grids} == {"tiles", "thumbnail"}
    shuffled = tiny.model.model.multi_modal_projector.pixel_shuffle(patch_colours(tiny, inputs["pixel_values"]))
    flat = grouped(shuffled, 3).flatten(1, 2).reshape(-1, 3).numpy()  # [views * 4, 3], views in prompt order
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, tiny.model.config.image_token_id))


@pytest.mark.torchvision
def test_scale_canvas_is_the_processors_pick():
    """Against Command A Vision's own canvas rule over every canvas of up to 12 tiles (its module needs
    torchvision)."""
    from transformers.models.cohere2_vision.image_processing_cohere2_vision import get_optimal_tiled_canvas

    for height, width in [(40, 64), (72, 48), (500, 90), (90, 500), (700, 700), (20, 30), (1000, 3000)]:
        cols, rows = get_optimal_tiled_canvas((height, width), (32, 32), 1, 12)
        assert scale_canvas(rows * cols, height, width, 32) == (rows, cols), (height, width)


def test_ovis2_thumbnail_then_tiles_of_merged_patches():
    """Ovis2's processor cuts each picture into up to 6 tiles (its covering-area rule) after a thumbnail; a vision
    tower with hidden_stride 2 merges 2 x 2 patches, through its own merge code: the transformer's output is
    replaced by the patch colours (a forward hook) and the merged features are read where the head gets them."""
    import copy

    from transformers.models.ovis2.modeling_ovis2 import Ovis2VisionModel

    tiny, _ = build("ovis2")
    tiny.processor.image_processor.crop_to_patches = True
    tiny.processor.image_processor.max_patches = 6
    vision = copy.deepcopy(tiny.model.config.vision_config)
    vision.hidden_stride = 2
    tiny.model.config.vision_config = vision  # what the layout reads: 4 x 4 patches -> 2 x 2 tokens a tile
    tiny.processor.image_seq_length = 4
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    layouts = run_layouts("ovis2", tiny, inputs)
    assert {g.kind for layout in layouts for g in layout.grids} == {"tiles", "thumbnail"}
    tower = Ovis2VisionModel(vision).eval()
    colours = patch_colours(tiny, inputs["pixel_values"])  # [views, 16, 3]
    wide = padded(colours, vision.hidden_size)
    seen = {}
    tower.transformer.register_forward_hook(lambda module, args, out: (wide,))
    tower.head_linear.register_forward_pre_hook(lambda module, args: seen.update(merged=args[0].clone()))
    with torch.no_grad():
        tower(inputs["pixel_values"])
    flat = grouped(seen["merged"], vision.hidden_size).reshape(-1, 3).numpy()  # [views * 4, 3], prompt order
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, tiny.model.config.image_token_id))


def test_got_ocr2_tiles_then_thumbnail_through_its_convolutions():
    """GOT-OCR2's processor cuts each picture into up to 6 tiles of 64 pixels and adds a thumbnail; its projector's
    own two stride-2 convolutions (their weights set to average each channel over 3 x 3) make each tile's 2 x 2
    tokens from the 8 x 8 SAM patches, zero padding left out by the weight channel."""
    import copy

    tiny, _ = build("got_ocr2")
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt", crop_to_patches=True,
                            max_patches=6)  # the processor's defaults override the image processor's
    layouts = run_layouts("got_ocr2", tiny, inputs)
    assert {g.kind for layout in layouts for g in layout.grids} == {"tiles", "thumbnail"}
    projector = copy.deepcopy(tiny.model.model.multi_modal_projector)
    with torch.no_grad():
        for conv in (projector.conv_upsampler1, projector.conv_upsampler2):
            conv.weight.zero_()
            for channel in range(3):
                conv.weight[channel, channel] = 1 / 9
    colours = patch_colours(tiny, inputs["pixel_values"])  # [views, 64, 3]
    views, patches, _ = colours.shape
    side = int(patches**0.5)
    channels = tiny.model.config.vision_config.output_channels
    grid = padded(colours, channels)
    grid = grid.transpose(1, 2).reshape(views, channels, side, side)  # the SAM neck's [views, C, H, W]
    seen = {}
    projector.multimodal_projector.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        projector(grid)
    flat = seen["x"][..., :3].reshape(-1, 3).numpy()  # [views * 4, 3], prompt order
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, tiny.model.config.image_token_id))


@pytest.mark.parametrize("fine", [False, True])
def test_granite_docling_named_tiles_then_global_image(fine: bool):
    """Granite-Docling's processor cuts each picture into up to 6 tiles of 64 pixels (<row_i_col_j>) and adds a
    global image; the connector's own pixel shuffle (factor 4 on the coarse path, 2 on the fine one) makes each
    tile's tokens. A third picture, one tile alone (no global image), ends the second row."""
    tiny, _ = build("granite_docling")
    tiny.processor.tokenizer.add_tokens([f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)],
                                        special_tokens=True)
    tiny.model.config.vision_config.use_fine_route = fine  # what the layout reads (the path is built or not)
    tiny.processor.image_seq_len = 4
    sizes = [*SIZES, (64, 64)]
    pictures = [coordinate_picture(h, w) for h, w in sizes]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe the pictures", images=3)]
    inputs = tiny.processor(text=prompts, images=[pictures[:2], pictures[2:]], padding=True, return_tensors="pt",
                            crop_to_patches=True, max_patches=6, fine_route=fine)
    layouts = run_layouts("granite_docling", tiny, inputs)
    kinds = [(g.image, g.kind) for g in layouts[1].grids]
    assert kinds == [(0, "tiles"), (0, "global"), (1, "tiles"), (1, "global"), (2, "patches")], kinds
    tiles = inputs["pixel_values"][inputs["pixel_attention_mask"]]  # [real tiles, 3, 64, 64]
    factor = tiny.model.config.vision_config.scale_factor // (2 if fine else 1)
    path = tiny.model.model.vision_model.connector.coarse  # the pixel shuffle is the same function on both paths
    flat = grouped(path.pixel_shuffle(patch_colours(tiny, tiles), factor), 3).reshape(-1, 3).numpy()
    colours = split_by_row(flat, inputs, tiny.model.config.image_token_id)
    check_tokens_on_grids(layouts, colours, images=(2, 3))
    assert [g.shape for g in layouts[1].grids if g.kind == "patches"] == [(2 * (1 + fine), 2 * (1 + fine))]


def average_first_channels(merger: torch.nn.Module, merge_size: int) -> None:
    """Set a Hunyuan-style patch merger's convolutions to average each merge x merge block (proj_conv) and keep
    (proj_out) the first 3 channels, where the test pictures' colours (x, y, 1) are."""
    for conv, size in ((merger.proj_conv, merge_size), (merger.proj_out, 1)):
        conv.weight.zero_()
        conv.bias.zero_()
        for channel in range(3):
            conv.weight[channel, channel] = 1 / size**2


def test_hunyuan_vl_merged_patches_with_a_newline_per_row():
    """HunyuanOCR's processor orders each picture's patches row-major; its patch merger (its own module: the
    reshape to (h, w), a 2 x 2 stride-2 convolution set to average, the newline column, the begin and end tokens;
    its norms and activation passed through by hooks) makes the tokens. Newline tokens come out NaN (the newline
    parameter set so), the begin and end tokens -inf."""
    tiny, inputs = build("hunyuan_vl")
    merger = tiny.model.model.vision_tower.patch_merger
    vision = tiny.model.config.vision_config
    with torch.no_grad():
        average_first_channels(merger, vision.spatial_merge_size)
        merger.mlp.weight.zero_()
        merger.mlp.weight[:3, :3] = torch.eye(3)
        merger.mlp.bias.zero_()
        merger.image_newline.fill_(float("nan"))
        merger.image_begin.fill_(-float("inf"))
        merger.image_end.fill_(-float("inf"))
    identity = lambda module, args, out: args[0]  # noqa: E731
    for module in (merger.before_rms, merger.proj_act, merger.after_rms):
        module.register_forward_hook(identity)
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    wide = padded(colours, vision.hidden_size)
    tokens = []
    with torch.no_grad():
        for thw, item in zip(inputs["image_grid_thw"].tolist(), wide.split(inputs["image_grid_thw"].prod(-1).tolist())):
            tokens.append(merger(item[None], size=tuple(thw[1:]))[0, :, :3])
    flat = torch.cat(tokens).numpy()
    layouts = row_layouts("hunyuan_vl", tiny.model.config, (inputs["input_ids"] == tiny.model.config.image_token_id)
                          .sum(1).tolist(), image_grid_thw=inputs["image_grid_thw"])
    colours_by_row = split_by_row(flat, inputs, tiny.model.config.image_token_id)
    for layout, seen in zip(layouts, colours_by_row):
        assert np.isneginf(seen[layout.unplaced]).all() and np.isneginf(seen).any(-1).sum() == len(layout.unplaced)
        seen[layout.unplaced] = 0.0  # checked: the begin and end tokens, on no grid
    check_tokens_on_grids(layouts, colours_by_row)


def test_hy_v4_vl_merged_patches_with_a_newline_per_row():
    """HY V4 VL's processor orders each picture's patches row-major; its patch merger (its own module: the reshape
    to (h, w), a 2 x 2 stride-2 convolution set to average, a 1 x 1 convolution set to keep the first 3 channels,
    the newline column; its norm and activation passed through by hooks) makes the tokens: no begin or end token,
    the newline tokens NaN (the newline parameter set so)."""
    tiny, inputs = build("hy_v4_vl")
    merger = tiny.model.model.vision_tower.patch_merger
    vision = tiny.model.config.vision_config
    with torch.no_grad():
        average_first_channels(merger, vision.spatial_merge_size)
        merger.image_newline.fill_(float("nan"))
    identity = lambda module, args, out: args[0]  # noqa: E731
    for module in (merger.before_rms, merger.proj_act):
        module.register_forward_hook(identity)
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    wide = padded(colours, vision.hidden_size)
    grid_thw = inputs["image_grid_thw"]
    with torch.no_grad():
        tokens = [merger(item[None], size=tuple(thw[1:]))[0, :, :3]
                  for thw, item in zip(grid_thw.tolist(), wide.split(grid_thw.prod(-1).tolist()))]
    layouts = row_layouts("hy_v4_vl", tiny.model.config, (inputs["input_ids"] == tiny.model.config.image_token_id)
                          .sum(1).tolist(), image_grid_thw=grid_thw)
    assert all(not layout.unplaced for layout in layouts)
    check_tokens_on_grids(layouts, split_by_row(torch.cat(tokens).numpy(), inputs, tiny.model.config.image_token_id))


@pytest.mark.torchvision
def test_minimax_m3_vl_merged_patches_through_its_projector():
    """MiniMax M3's processor (torchvision) lays each picture's patches in 2 x 2 merge blocks; the model's own
    get_image_features (the vision tower's output replaced by each patch's colour, a forward hook) runs its projector,
    whose per-patch MLP is passed through (hooks) and whose reshape puts each merge block's patches into one token
    (its merging MLP's input read)."""
    tiny, inputs = build("minimax_m3_vl")
    config = tiny.model.config
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    model = tiny.model.model
    projector = model.multi_modal_projector

    def tower_output(module, args, out):
        out.last_hidden_state = padded(colours, config.vision_config.hidden_size)[None]
        return out

    model.vision_tower.register_forward_hook(tower_output)
    projector.linear_1.register_forward_hook(lambda module, args, out: padded(args[0][..., :3], out.shape[-1]))
    projector.act.register_forward_hook(lambda module, args, out: args[0])
    projector.linear_2.register_forward_hook(lambda module, args, out: padded(args[0][..., :3], out.shape[-1]))
    seen = {}
    projector.merge_linear_1.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    tokens = grouped(seen["x"], config.text_config.hidden_size)  # [tokens, 3]: each merge block's mean
    check_tokens_on_grids(merged_layouts("minimax_m3_vl", tiny, inputs),
                          split_by_row(tokens.numpy(), inputs, config.image_token_id))


@pytest.mark.parametrize("merge", [1, 2])
def test_video_llama_3_merged_patches_of_each_images_merge_size(merge: int):
    """VideoLLaMA 3's processor orders patches in merge blocks and names each image's merge size; the vision
    model's own pixel_unshuffle puts them back on the (h, w) grid and shrinks it by bilinear interpolation."""
    tiny, _ = build("video_llama_3")
    tiny.processor.image_processor.merge_size = merge
    pictures = [coordinate_picture(h, w) for h, w in SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    assert inputs["image_merge_sizes"].tolist() == [merge] * 4
    config = tiny.model.config
    layouts = row_layouts("video_llama_3", config, (inputs["input_ids"] == config.image_token_id).sum(1).tolist(),
                          image_grid_thw=inputs["image_grid_thw"], image_merge_sizes=inputs["image_merge_sizes"])
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    with torch.no_grad():
        tokens = tiny.model.model.vision_model.pixel_unshuffle(colours, inputs["image_grid_thw"],
                                                               inputs["image_merge_sizes"])
    check_tokens_on_grids(layouts, split_by_row(tokens.numpy(), inputs, config.image_token_id))


@pytest.mark.torchvision
def test_gemma4_unified_model_patches():
    """Gemma 4 Unified's processor (torchvision) merges each k x k block of patches into one model patch, row-major
    by block, and the model keeps one token per model patch (the padding rows stripped in order)."""
    tiny, inputs = build("gemma4_unified")
    config = tiny.model.config
    counts = (inputs["input_ids"] == config.image_token_id).sum(1).tolist()
    layouts = row_layouts("gemma4_unified", config, counts,
                          image_patch_grids=patch_grids(inputs["image_position_ids"]))
    pixels = inputs["pixel_values"].float()  # [images, model patches, (k p)^2 * 3]: its sub-patches, channel last
    images, patches, _ = pixels.shape
    colours = pixels.reshape(images, patches, -1, 3).mean(2)  # rescaled to [0, 1]: (x, y, 1)
    real = (inputs["image_position_ids"] != -1).all(-1)  # what get_image_features keeps, in order
    flat = colours[real].numpy()
    for b, layout in enumerate(layouts):
        for grid in layout.grids:
            height, width = SIZES[2 * b + grid.image]
            assert (grid.shape[0] < grid.shape[1]) == (height < width)
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id))


def merged_layouts(family: str, tiny, inputs):
    config = tiny.model.config
    return row_layouts(family, config, (inputs["input_ids"] == config.image_token_id).sum(1).tolist(),
                       image_grid_thw=inputs["image_grid_thw"])


@pytest.mark.torchvision
def test_kimi_k25_merged_patches_through_its_temporal_merge():
    """Kimi K2.5's processor (torchvision) lays each picture's patches row-major; the vision tower's own
    temporal_merge gathers each merge_kernel_size block into a token (and averages an image's frames)."""
    tiny, inputs = build("kimi_k25")
    pixels = inputs["pixel_values"]  # [patches, 3, p, p]
    colours = unnormalised(tiny.processor, pixels.transpose(0, 1)).mean((-1, -2)).T  # [patches, 3]: (x, y, 1)
    tower = tiny.model.model.vision_tower
    with torch.no_grad():
        tokens = tower.temporal_merge(colours, inputs["image_grid_thw"], *tower.merge_kernel_size).mean(1)
    check_tokens_on_grids(merged_layouts("kimi_k25", tiny, inputs),
                          split_by_row(tokens.numpy(), inputs, tiny.model.config.image_token_id))


@pytest.mark.torchvision
@pytest.mark.parametrize("family", ["muse_glimmer", "muse_spark"])
def test_muse_merged_patches_through_its_pixel_shuffle(family: str):
    """Muse Glimmer's / Muse Spark's processor (torchvision) lays each picture's patches row-major, each row
    (temporal, channel, p, p); the vision tower's own pixel_shuffle gathers each merge_size block into a token
    (its features channel-major)."""
    tiny, inputs = build(family)
    pixels = inputs["pixel_values"]  # [patches, t * 3 * p * p]
    patch = tiny.model.config.vision_config.patch_size
    patches = pixels.view(len(pixels), -1, 3, patch * patch).transpose(1, 2).flatten(2)  # [n, 3, t * p * p]
    colours = unnormalised(tiny.processor, patches.transpose(0, 1)).mean(-1).T  # [patches, 3]: (x, y, 1)
    tower = tiny.model.model.vision_tower
    with torch.no_grad():
        shuffled = tower.pixel_shuffle(colours, inputs["image_grid_thw"])  # [tokens, 3 * m * m], channel slowest
    tokens = shuffled.view(len(shuffled), 3, -1).mean(-1)
    check_tokens_on_grids(merged_layouts(family, tiny, inputs),
                          split_by_row(tokens.numpy(), inputs, tiny.model.config.image_token_id))


def test_fuyu_patch_rows_past_the_picture_to_whole_patches():
    """Fuyu's processor shrinks each picture to fit 32 x 32 (a small one stays as it is), pads it and cuts whole
    8-pixel patches, one run of tokens per patch row; the model embeds each patch as its token, in order. Each
    token's pixels lie in the part of its cell (from the grid's extent over the picture) that the picture covers."""
    from tests.conftest import tiny_model

    tiny = tiny_model("fuyu")
    tiny.processor.image_processor.padding_value = 0.0  # padding is not blue: left out of each patch's weight
    sizes = [(40, 64), (72, 48), (20, 28)]  # shrunk by 1/2, by 4/9, left alone; none fills whole patches
    prompts = [tiny.prompt("what is it", images=1) for _ in sizes]
    inputs = tiny.processor(text=prompts, images=[coordinate_picture(h, w) for h, w in sizes], padding=True,
                            return_tensors="pt")
    config = tiny.model.config
    image = inputs["input_ids"] == config.image_token_id
    layouts = row_layouts("fuyu", config, image.sum(1).tolist(),
                          image_positions=[row.nonzero().flatten().tolist() for row in image])
    pixels = inputs["pixel_values"].float().reshape(len(inputs["pixel_values"]), -1, 3)  # [patches, p * p, 3]
    colours = pixels * 0.5 + 0.5  # the processor's mean and std: 0.5
    on_picture = (colours[..., 2] > 0.9).float()
    seen = torch.stack([(colours[..., 0] * on_picture).sum(-1), (colours[..., 1] * on_picture).sum(-1),
                        on_picture.sum(-1)], -1).numpy()
    seen = split_by_row(seen, inputs, config.image_token_id)
    for b, ((height, width), layout) in enumerate(zip(sizes, layouts)):
        (grid,) = layout.grids
        left, right, bottom, top = grid.extent(height, width)
        assert left == top == 0 and right >= width and bottom >= height
        rows, cols = grid.shape
        assert rows * grid.patch_pixels >= height * min(1.0, 32 / height, 32 / width)
        for (r, c), token in np.ndenumerate(grid.tokens):
            if seen[b][token, 2] == 0:
                assert r == rows - 1 or c == cols - 1  # only the overhanging last row or column sees no picture
                continue
            cell_top, cell_left = r * bottom / rows, c * right / cols
            visible_y = (cell_top, min(height, cell_top + bottom / rows))  # the part of the cell on the picture
            visible_x = (cell_left, min(width, cell_left + right / cols))
            expected = np.array([sum(visible_x) / 2 / width, sum(visible_y) / 2 / height])
            where = seen[b][token, :2] / seen[b][token, 2]
            assert np.allclose(where, expected, atol=0.04), (b, r, c, where, expected)


def test_dots3_note_merged_patches_through_its_merger():
    """Dots3 Note's processor (Qwen2-VL's) lays each picture's patches in 2 x 2 merge blocks; the vision tower's own
    merger reads each adapter_merge_size^2 consecutive patches as one token (its LayerNorm passed through by a
    hook, its MLP's input read)."""
    tiny, inputs = build("dots3_note")
    vision = tiny.model.config.vision_config
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    merger = tiny.model.model.vision_tower.merger
    seen = {}
    merger.ln_q.register_forward_hook(lambda module, args, out: args[0])
    merger.mlp[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        merger(padded(colours, vision.adapter_in_dim))
    tokens = grouped(seen["x"], vision.adapter_in_dim)  # [tokens, 3]
    check_tokens_on_grids(merged_layouts("dots3_note", tiny, inputs),
                          split_by_row(tokens.numpy(), inputs, tiny.model.config.image_token_id))


@pytest.mark.torchvision
def test_fast_vlm_feature_map_over_the_centre_crop():
    """FastVLM's processor (LLaVA's CLIP one, as its checkpoints ship it) crops each picture's central square; the
    timm tower's last feature map (64x downsampled, 2 x 2 here) is replaced by each 64-pixel block's mean colour
    (a forward hook) and the model's own get_image_features flattens it into tokens (its projector's input read)."""
    tiny, inputs = build("fast_vlm")
    pixels = inputs["pixel_values"]  # [images, 3, S, S]: the central squares
    layouts = run_layouts("fast_vlm", tiny, inputs)
    images, _, size, _ = pixels.shape
    side = math.isqrt(int((inputs["input_ids"][0] == tiny.model.config.image_token_id).sum()) // 2)
    block = size // side
    colours = unnormalised(tiny.processor, pixels.transpose(0, 1))  # [3, images, S, S]
    feature_map = colours.reshape(3, images, side, block, side, block).mean((3, 5)).transpose(0, 1)  # [images, 3, s, s]
    vision = tiny.model.config.vision_config
    wide = torch.cat([feature_map, feature_map.new_zeros(images, vision.hidden_size - 3, side, side)], 1)

    def replace_map(module, args, out):
        assert out.last_hidden_state.shape == wide.shape  # the tower's real map: [images, channels, side, side]
        out.last_hidden_state = wide
        return out

    seen = {}
    tiny.model.model.vision_tower.register_forward_hook(replace_map)
    tiny.model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        tiny.model.model.get_image_features(pixel_values=pixels)
    flat = seen["x"][..., :3].reshape(-1, 3).numpy()  # [images * side^2, (x, y, 1)], prompt order
    colours = split_by_row(flat, inputs, tiny.model.config.image_token_id)
    for b, layout in enumerate(layouts):
        for grid in layout.grids:  # each token's (x, y) as fractions of the picture's part that its grid covers
            height, width = SIZES[2 * b + grid.image]
            top, left, crop_h, crop_w = grid.crop(height, width)
            assert grid.square_crop and crop_h == crop_w == min(height, width)
            tokens = grid.tokens.reshape(-1)
            colours[b][tokens, 0] = (colours[b][tokens, 0] * width - left) / crop_w
            colours[b][tokens, 1] = (colours[b][tokens, 1] * height - top) / crop_h
    check_tokens_on_grids(layouts, colours)


@pytest.mark.torchvision
def test_apertus1p5_vq_codes_row_major_from_image_sizes():
    """Apertus 1.5's processor resizes each picture to multiples of 16 pixels; the model's own get_image_tokens
    encodes each image at its size and flattens its code map. The encoder's latent is replaced (a forward hook on
    quant_conv) by each 16-pixel block's mean colour (x, y, 1), and the codebook by those colours in a shuffled
    order, scored so that the dot-product argmax picks the block's own entry: a token's code names its block."""
    tiny, inputs = build("apertus1p5")
    config = tiny.model.config
    tokenizer = tiny.model.model.vision_tokenizer
    factor = config.vision_config.spatial_scale_factor
    sizes = inputs["image_sizes"].tolist()
    colours = unnormalised(tiny.processor, inputs["pixel_values"].transpose(0, 1))  # [3, images, H, W]
    prototypes = []  # per image: [codes, 3] (x, y, 1) of the block each code stands for

    def replace_latent(module, args, out):
        k = len(prototypes)
        height, width = sizes[k]
        assert out.shape[-2:] == (height // factor, width // factor)
        blocks = colours[:, k, :height, :width].reshape(3, height // factor, factor, width // factor, factor)
        blocks = blocks.mean((2, 4))  # [3, rows, cols]
        order = torch.randperm(blocks[0].numel(), generator=torch.Generator().manual_seed(k))
        entries = blocks.flatten(1).T[order]  # [codes, 3]
        prototypes.append(entries)
        x, y = entries[:, 0], entries[:, 1]
        with torch.no_grad():  # score 2 x xj + 2 y yj - (xj^2 + yj^2): largest at the block's own colour
            tokenizer.quantize.embedding.weight.fill_(0.0)
            tokenizer.quantize.embedding.weight[:, 2] = -1e3
            tokenizer.quantize.embedding.weight[: len(entries), :3] = torch.stack([2 * x, 2 * y, -(x**2 + y**2)], -1)
        latent = out.new_zeros(out.shape)
        latent[0, :3] = torch.stack([blocks[0], blocks[1], torch.ones_like(blocks[0])])
        return latent

    tokenizer.quant_conv.register_forward_hook(replace_latent)
    with torch.no_grad():
        codes = tiny.model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
    flat = torch.cat([prototypes[k][c - config.image_token_offset] for k, c in enumerate(codes)]).numpy()
    flat[:, 2] = 1.0  # (x, y, 1): every block is picture
    layouts = row_layouts("apertus1p5", config, (inputs["input_ids"] == config.image_token_id).sum(1).tolist(),
                          image_sizes=inputs["image_sizes"])
    for b, layout in enumerate(layouts):
        for grid in layout.grids:
            height, width = SIZES[2 * b + grid.image]
            assert (grid.shape[0] < grid.shape[1]) == (height < width)  # the picture's aspect ratio
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id))


@pytest.mark.torchvision
def test_perception_canvas_is_the_processors_pick():
    """Against PerceptionLM's own image processor (torchvision) for tile budgets from 1 to 36 tiles: pictures that fit
    a canvas, pictures too large for every one, wide, tall and square ones."""
    from transformers.models.perception_lm.image_processing_perception_lm import PerceptionLMImageProcessor

    for max_tiles in (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 36):
        processor = PerceptionLMImageProcessor(tile_size=32, max_num_tiles=max_tiles)
        for height, width in [(40, 64), (72, 48), (56, 88), (64, 40), (32, 32), (48, 48), (20, 30), (31, 200),
                              (200, 31), (90, 300), (300, 90), (400, 400), (64, 128), (128, 64), (33, 97)]:
            _, (across, down) = processor.resize(torch.zeros(1, 3, height, width), 32, max_num_tiles=max_tiles)
            assert perception_canvas(height, width, 32, max_tiles) == (down, across), (max_tiles, height, width)


@pytest.mark.torchvision
def test_perception_lm_thumbnail_then_tiles_through_its_pooling():
    """PerceptionLM's processor (torchvision) stretches each picture to a thumbnail tile and over a canvas of up to 4
    tiles; the timm tower's output is replaced (a forward hook) by a CLS token and each 8-pixel patch's colour, the
    projector's linear layers pass it through (hooks), and the model's own get_image_features drops the CLS token
    and pools 2 x 2 patches into each token (its pooling's output read). Both pictures of a row are one run."""
    tiny, inputs = build("perception_lm")
    config = tiny.model.config
    pixels = inputs["pixel_values"]  # [images, views, 3, 32, 32]
    views = pixels.flatten(0, 1)
    patch = config.vision_config.model_args["patch_size"]
    colours = unnormalised(tiny.processor, views.transpose(0, 1))  # [3, views, 32, 32]
    count, size = colours.shape[1], colours.shape[-1]
    blocks = colours.reshape(3, count, size // patch, patch, size // patch, patch).mean((3, 5))
    patches = blocks.flatten(2).permute(1, 2, 0)  # [views, patches, 3], row-major
    embed = config.vision_config.model_args["embed_dim"]
    tower_out = padded(torch.cat([patches.new_full((count, 1, 3), float("nan")), patches], 1), embed)

    def replace_output(module, args, out):
        assert out.last_hidden_state.shape == tower_out.shape  # [views, CLS + patches, embed]
        out.last_hidden_state = tower_out
        return out

    projector = tiny.model.model.multi_modal_projector
    hidden = config.text_config.hidden_size
    seen = {}
    tiny.model.model.vision_tower.register_forward_hook(replace_output)
    projector.linear_1.register_forward_hook(lambda module, args, out: padded(args[0][..., :3], hidden))
    for module in (projector.gelu, projector.linear_2):
        module.register_forward_hook(lambda module, args, out: args[0])
    projector.pooling.register_forward_hook(lambda module, args, out: seen.update(tokens=out[..., :3].clone()))
    with torch.no_grad():
        tiny.model.model.get_image_features(pixel_values=pixels)
    flat = seen["tokens"].reshape(-1, 3).numpy()  # [views * 4, 3], prompt order
    assert not np.isnan(flat).any()  # the CLS token is dropped
    layouts = run_layouts("perception_lm", tiny, inputs)
    assert [len(layout.grids) for layout in layouts] == [4, 4]  # two pictures a row: a thumbnail and tiles each
    assert {g.kind for layout in layouts for g in layout.grids} == {"tiles", "thumbnail"}
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id))


def test_perception_lm_tiling_needs_the_pictures_and_names_a_mismatch():
    from types import SimpleNamespace

    vision = SimpleNamespace(architecture="vit_pe_core_tiny_patch16_384", model_args={"img_size": 32, "patch_size": 8})
    config = SimpleNamespace(vision_config=vision, projector_pooling_ratio=2)  # 2 x 2 tokens a 32-pixel view
    with pytest.raises(ValueError, match="images="):
        row_layouts("perception_lm", config, [40])
    with pytest.raises(ValueError, match="match no tiling"):
        row_layouts("perception_lm", config, [41], image_shapes={0: SIZES[:2]})


@pytest.mark.torchvision
def test_step3p7_tiles_then_global_view_through_its_convolutions():
    """Step 3.7's processor (torchvision) cuts the pictures into windows (one row of two, or a column of two, here)
    and stretches each to a 64-pixel global view; the tower's transformer output is replaced (a forward hook) by
    each 4-pixel patch's colour, its own two stride-2 convolutions (set to average each channel over 3 x 3) make the
    tokens, and the model's own get_image_features orders each image's tiles before its global view."""
    tiny, inputs = build("step3p7")
    config = tiny.model.config
    tower = tiny.model.model.vision_model
    with torch.no_grad():
        for conv in (tower.downsampler1, tower.downsampler2):
            conv.weight.zero_()
            conv.bias.zero_()
            for channel in range(3):
                conv.weight[channel, channel] = 1 / 9
    hidden = config.vision_config.hidden_size

    def replace_output(module, args, out):  # the last layer's output: each patch's (x * w, y * w, w)
        views = args[0].shape[0]
        pixels = inputs["pixel_values"] if views == len(inputs["pixel_values"]) else inputs["pixel_values_local"]
        return padded(patch_colours(tiny, pixels), hidden)

    tower.layers[-1].register_forward_hook(replace_output)
    projector = tiny.model.model.multi_modal_projector
    projector.register_forward_hook(lambda module, args, out: padded(args[0][..., :3], out.shape[-1]))
    with torch.no_grad():
        merged = tiny.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_values_local=inputs["pixel_values_local"],
            num_local_patches=inputs["num_local_patches"].tolist()).pooler_output
    flat = torch.cat(list(merged))[:, :3].numpy()  # [image tokens, 3], prompt order
    layouts = run_layouts("step3p7", tiny, inputs)
    shapes = [[g.shape for g in layout.grids if g.kind == "tiles"] for layout in layouts]
    assert shapes == [[(3, 6), (6, 3)], [(3, 6), (6, 3)]], shapes  # 2 tiles of 3 x 3 tokens across, then down
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id))


LLAMA4_SIZES = [(56, 88), (20, 30), (200, 100), (40, 64)]  # 2 x 2 tiles, 1 enlarged, 2 x 1 shrunk, 1 x 2 padded


@pytest.mark.torchvision
def test_llama4_tiles_then_global_view_through_its_pixel_shuffle():
    """Llama 4's processor (torchvision) resizes each picture (aspect kept; a side under a tile enlarged, a large
    picture shrunk) into the top-left corner of a canvas of up to 4 48-pixel tiles and pads it, then stretches it to
    one tile, its global view; a picture of one tile is that tile alone. The vision tower's encoder output is
    replaced (a forward hook on its layernorm_post) by each 8-pixel patch's colour and a NaN CLS token (last), and
    the tower's own forward drops the CLS token and pixel-shuffles each 2 x 2 patches into a token (read at its
    adapter MLP's input): each token must lie on its grid cell, the cells over the grid's extent of the picture."""
    tiny = tiny_model("llama4")
    config = tiny.model.config
    pictures = [coordinate_picture(h, w) for h, w in LLAMA4_SIZES]
    prompts = [tiny.prompt("what is it", images=2), tiny.prompt("describe both pictures", images=2)]
    inputs = tiny.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    views = inputs["pixel_values"].float()  # [views, 3, 48, 48]: each image's tiles, then its global view
    hidden = config.vision_config.hidden_size
    patches = patch_colours(tiny, views)  # [views, 36, 3]
    encoded = padded(torch.cat([patches, patches.new_full((len(views), 1, 3), float("nan"))], 1), hidden)
    tower = tiny.model.vision_model
    tower.layernorm_post.register_forward_hook(lambda module, args, out: encoded)
    seen = {}
    tower.vision_adapter.mlp.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0].clone()))
    with torch.no_grad():
        tower(views)
    tokens = grouped(seen["tokens"], hidden)  # [views, 9, 3]: the shuffle's 4 patches' channels, hidden each
    flat = tokens.reshape(-1, 3).numpy()
    assert not np.isnan(flat).any()  # the CLS token is dropped
    layouts = run_layouts("llama4", tiny, inputs, LLAMA4_SIZES)
    kinds = [[(g.image, g.kind, g.shape) for g in layout.grids] for layout in layouts]
    assert kinds == [[(0, "tiles", (6, 6)), (0, "global", (3, 3)), (1, "patches", (3, 3))],
                     [(0, "tiles", (6, 3)), (0, "global", (3, 3)), (1, "tiles", (3, 6)), (1, "global", (3, 3))]]
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id), sizes=LLAMA4_SIZES)


@pytest.mark.torchvision
def test_llama4_grid_extent_is_the_processors_resize():
    """Over pictures smaller, larger and thinner than its tiles, the part of Llama 4's canvas (or single tile) that
    its own image processor fills with the picture (blue = 1; its padding is 0) is the part the grid's extent puts
    it on, within a pixel (the processor floors the side that does not fill its target)."""
    tiny = tiny_model("llama4")
    processor = tiny.processor.image_processor
    config = tiny.model.config
    tile = config.vision_config.image_size
    side = int(tile // config.vision_config.patch_size * config.vision_config.pixel_shuffle_ratio)  # tokens a side
    for height, width in [(20, 30), (30, 20), (48, 48), (40, 64), (100, 30), (200, 100), (13, 170), (500, 400)]:
        out = processor(coordinate_picture(height, width), return_tensors="pt")
        rows, cols = out["aspect_ratios"][0].tolist()
        views = out["pixel_values"][: rows * cols].float()  # [tiles, 3, 48, 48]: the canvas cut row-major
        blue = unnormalised(tiny.processor, views.transpose(0, 1))[2] > 0.5  # [tiles, 48, 48]
        canvas = blue.reshape(rows, cols, tile, tile).transpose(1, 2).reshape(rows * tile, cols * tile)
        filled_h, filled_w = int(canvas.any(1).sum()), int(canvas.any(0).sum())
        assert canvas[:filled_h, :filled_w].all()  # the picture sits in the top-left corner
        grid = TokenGrid(0, "tiles", np.zeros((rows * side, cols * side), dtype=int), patch_pixels=tile // side,
                         enlarge_to=tile)
        left, right, bottom, top = grid.extent(height, width)
        assert abs(cols * tile * width / (right - left) - filled_w) <= 1, (height, width)
        assert abs(rows * tile * height / (bottom - top) - filled_h) <= 1, (height, width)


def test_llama4_names_a_broken_tile_layout():
    from types import SimpleNamespace

    from vlmfix.viz.patches import _llama4_row

    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=48))
    runs = [(0, 9), (9, 9), (18, 9), (27, 9)]
    ragged = [("<|image_start|>", ""), ("<|tile_x_separator|>", ""), ("<|tile_y_separator|>", ""), ("<|image|>", "")]
    with pytest.raises(ValueError, match="canvas rows of \\[2, 1\\] tiles"):
        _llama4_row(config, 0, runs, ragged, 3)
    with pytest.raises(ValueError, match="no global view"):
        _llama4_row(config, 0, runs[:1], ragged[:1], 3)
    with pytest.raises(ValueError, match="follows '<\\|tile_x_separator\\|>'"):
        _llama4_row(config, 0, runs[1:2], ragged[1:2], 3)


def test_step3p7_reads_canvas_rows_from_the_gaps_and_refuses_a_padded_picture():
    """A prompt written by hand as Step 3.7's processor writes it: two 3 x 3 tiles, <patch_end> <patch_start>
    between them (2 tokens: one canvas row) or with <patch_newline> (3 tokens: two rows), then a 4 x 4 global view."""
    from types import SimpleNamespace

    specials = {1: "<patch_start>", 2: "<patch_end>", 3: "<im_start>", 4: "<im_end>"}
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda i: specials[i])
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=64, patch_size=4))
    around = [[[1, 2], [1, 2], [3, 4]]]

    def layout(gap: int, shape: tuple[int, int]):
        second = 10 + gap
        positions = [*range(1, 10), *range(second, second + 9), *range(second + 11, second + 27)]
        return row_layouts("step3p7", config, [34], image_positions=[positions], image_run_tokens=around,
                           tokenizer=tokenizer, image_shapes={0: [shape]})[0]

    assert [(g.kind, g.shape) for g in layout(2, (40, 64)).grids] == [("tiles", (3, 6)), ("global", (4, 4))]
    tiles = layout(3, (72, 48)).grids[0]
    assert tiles.shape == (6, 3) and tiles.tokens[3:, :].min() == 9  # the second tile below the first
    with pytest.raises(ValueError, match="4 tokens apart"):
        layout(4, (40, 64))
    with pytest.raises(ValueError, match="pads to a square"):
        layout(2, (20, 100))
    with pytest.raises(ValueError, match="more step3p7 images than the 0 pictures"):
        row_layouts("step3p7", config, [34], image_positions=[[*range(1, 10), *range(12, 21), *range(23, 39)]],
                    image_run_tokens=around, tokenizer=tokenizer, image_shapes={0: []})


@pytest.mark.torchvision
def test_molmo2_low_res_view_then_canvas_through_its_pooling():
    """Molmo2's processor (torchvision) stretches each picture to one 32-pixel crop and over a canvas of overlapping
    crops, and names the patches each token pools (image_token_pooling, the overlaps left out); the adapter's own
    gather and mean (its query) make each token from the patch colours, its attention and projector passed through
    (hooks)."""
    tiny, inputs = build("molmo2")
    config = tiny.model.config
    patch = config.vision_config.patch_size
    pixels = inputs["pixel_values"].float()  # [crops, patches, p * p * 3]: each patch's pixels, channel last
    crops, patches, _ = pixels.shape
    mean = torch.tensor(tiny.processor.image_processor.image_mean)
    std = torch.tensor(tiny.processor.image_processor.image_std)
    colours = (pixels.reshape(crops, patches, patch * patch, 3) * std + mean).mean(2)  # [crops, patches, (x, y, 1)]
    adapter = tiny.model.model.multi_modal_projector
    width = adapter.config.hidden_size * len(adapter.config.vision_feature_layer)
    # the attention's output is the query (the mean of the token's patches), cut to the attention's own width
    adapter.image_pooling_2d.register_forward_hook(lambda module, args, out: (args[0][..., : out[0].shape[-1]], None))
    adapter.image_projector.register_forward_hook(lambda module, args, out: args[0])
    with torch.no_grad():
        pooled = adapter(padded(colours, width), inputs["image_token_pooling"]).last_hidden_state
    flat = pooled[:, :3].numpy()  # [image tokens, 3], prompt order
    layouts = run_layouts("molmo2", tiny, inputs)
    shapes = [[g.shape for g in layout.grids] for layout in layouts]
    assert shapes == [[(2, 2), (2, 3), (2, 2), (3, 2)]] * 2, shapes  # wide pictures: a canvas 3 across, tall: 3 down
    check_tokens_on_grids(layouts, split_by_row(flat, inputs, config.image_token_id))


def test_molmo2_rows_from_column_tokens_and_refused_without_them():
    """Molmo2's prompt written by hand: a 2 x 2 low-resolution view and a 2 x 3 canvas, <im_col> after each row; a
    view written without column tokens (image_use_col_tokens=False) cannot be cut into rows."""
    from types import SimpleNamespace

    specials = {1: "<low_res_im_start>", 2: "<im_col>", 3: "<im_end>", 4: "<im_start>"}
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda i: specials[i])
    # <low_res_im_start> PP <im_col> PP <im_col> <im_end> <im_start> PPP <im_col> PPP <im_col> <im_end>
    positions = [1, 2, 4, 5, 9, 10, 11, 13, 14, 15]
    around = [[1, 2], [2, 2], [4, 2], [2, 2]]
    (layout,) = row_layouts("molmo2", None, [10], image_positions=[positions], image_run_tokens=[around],
                            tokenizer=tokenizer)
    assert [(g.image, g.kind, g.tokens.tolist()) for g in layout.grids] == [
        (0, "low_res", [[0, 1], [2, 3]]), (0, "canvas", [[4, 5, 6], [7, 8, 9]])]
    with pytest.raises(ValueError, match="low-resolution view .* unless use_single_crop_col_tokens=False"):
        row_layouts("molmo2", None, [10], image_positions=[[*range(1, 5), *range(7, 13)]],
                    image_run_tokens=[[[1, 3], [4, 3]]], tokenizer=tokenizer)
    # the low-resolution view with its column tokens, the canvas without (image_use_col_tokens=False)
    with pytest.raises(ValueError, match="canvas rows .* unless image_use_col_tokens=False"):
        row_layouts("molmo2", None, [10], image_positions=[[1, 2, 4, 5, *range(9, 15)]],
                    image_run_tokens=[[[1, 2], [2, 2], [4, 3]]], tokenizer=tokenizer)


def test_fast_vlm_back_to_back_images_split_by_the_pictures_or_image_seq_length():
    """Four 2 x 2 FastVLM feature maps written back to back are one run of 16 tokens, a square like one 4 x 4 map:
    the pictures split it (16 tokens over 4 pictures), else the config's image_seq_length (4) when it divides the
    run; a square run with neither is refused, as is a split the pictures contradict."""
    from types import SimpleNamespace

    def four_maps(start: int) -> list[list[list[int]]]:  # the expected four 2 x 2 row-major maps
        return [[[start + 4 * k, start + 4 * k + 1], [start + 4 * k + 2, start + 4 * k + 3]] for k in range(4)]

    def grids(config, shapes=None, positions=range(16)):
        layout = row_layouts("fast_vlm", config, [len(positions)], image_positions=[list(positions)],
                             image_shapes=None if shapes is None else {0: shapes})[0]
        return [(g.image, g.tokens.tolist()) for g in layout.grids]

    expected = list(enumerate(four_maps(0)))
    assert grids(SimpleNamespace(image_seq_length=4)) == expected
    assert grids(SimpleNamespace(image_seq_length=576), shapes=[(30, 40)] * 4) == expected  # a stale default count
    assert grids(SimpleNamespace(image_seq_length=576)) == [(0, [list(range(4 * r, 4 * r + 4)) for r in range(4)])]
    # two runs (text between them): 8 and 8 tokens, each two 2 x 2 maps
    assert grids(SimpleNamespace(image_seq_length=4), positions=[*range(8), *range(9, 17)]) == expected
    with pytest.raises(ValueError, match="no image_seq_length"):
        grids(SimpleNamespace())
    with pytest.raises(ValueError, match="not 3 equal square feature maps"):
        grids(SimpleNamespace(image_seq_length=4), shapes=[(30, 40)] * 3)


def identity(module: torch.nn.Module) -> None:
    """Pass `module`'s first input through (a forward hook)."""
    module.register_forward_hook(lambda mod, args, out: args[0])


def test_llava_onevision1_5_merged_patches_through_its_tower():
    """LLaVA-OneVision-1.5's processor (Qwen2-VL's, one frame a patch) lays each picture's patches in 2 x 2 merge
    blocks; the RICE-ViT tower's own code (a class token put before each image's patches and dropped after the
    blocks, the merger reading 4 consecutive patches as one token) keeps that order: the patch embedding's output is
    replaced by each patch's colour, the norms and blocks passed through (hooks), the merger's MLP input read."""
    tiny, inputs = build("llava_onevision1_5")
    vision = tiny.model.config.vision_config
    tower = tiny.model.model.visual
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    tower.patch_embed.register_forward_hook(lambda module, args, out: padded(colours, vision.hidden_size))
    for module in (tower.pre_layernorm, *tower.blocks, tower.merger.norm):
        identity(module)
    seen = {}
    tower.merger.linear_fc1.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = grouped(seen["x"], vision.hidden_size)  # [tokens, 3]
    check_tokens_on_grids(merged_layouts("llava_onevision1_5", tiny, inputs),
                          split_by_row(tokens.numpy(), inputs, tiny.model.config.image_token_id))


def test_ovis2_5_stays_refused_while_its_tokens_come_in_window_order():
    """transformers 5.25's Ovis2_5Model.get_image_features feeds its visual tokenizer the last encoder layer's
    recorded output, which is still in the tower's window order (the tower undoes that order for its
    last_hidden_state only; AIDC-AI's own code undoes it for every recorded layer): the image tokens then follow
    the windows of 2 x 2 merged cells of the tiny build, not the merged grid's rows. The pictures refuse Ovis2.5
    until the port keeps the grid's order: this test fails once it does."""
    tiny, inputs = build("ovis2_5")
    vision = tiny.model.config.vision_config
    model = tiny.model.model
    colours = flat_patch_colours(tiny, inputs)  # [patches, 3]: (x, y, 1)
    model.vision_tower.embeddings.register_forward_hook(lambda module, args, out: padded(colours, vision.hidden_size))
    for layer in model.vision_tower.layers:
        identity(layer)
    seen = {}
    model.multi_modal_projector.visual_tokenizer.linear.register_forward_pre_hook(
        lambda module, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    tokens = grouped(seen["x"], vision.hidden_size)  # [tokens, 3], the order the prompt's atoms get them
    merge, side = vision.spatial_merge_size, vision.window_size // vision.spatial_merge_size // vision.patch_size
    raster, windowed, start = [], [], 0
    for _, h, w in inputs["image_grid_thw"].tolist():  # each image's merged cells: [rows, cols] of their colours
        rows, cols = h // merge, w // merge
        cells = colours[start * merge**2 : (start + rows * cols) * merge**2]  # in 2 x 2 merge blocks
        grid = cells.view(rows * cols, merge**2, 3).mean(1).view(rows, cols, 3)
        raster.append(grid.reshape(-1, 3))
        windowed += [grid[r : r + side, c : c + side].reshape(-1, 3) for r in range(0, rows, side)
                     for c in range(0, cols, side)]  # window by window, each window's cells row by row
        start += rows * cols
    assert not torch.allclose(tokens, torch.cat(raster))  # not the merged grid's order
    torch.testing.assert_close(tokens, torch.cat(windowed))
    with pytest.raises(ValueError, match="cannot place ovis2_5.s image tokens on its images: .*window order"):
        row_layouts("ovis2_5", tiny.model.config, [16])
