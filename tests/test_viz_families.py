"""`session.plot` on a tiny model of every family with a patch grid: it draws, each image panel holds PAI's
per-token gain where the family's processor and vision tower put the token, and the head map VHR's divergence.

The expected grids are rebuilt here from the processor's outputs with plain arithmetic (`image_grid_thw`,
`image_sizes`, transformers' own AnyRes helpers, tokens per image), not with `vlmfix.viz.patches`; then they are
compared with the arrays read back from the figure. Two images per row where the family takes them.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image  # noqa: E402

import vlmfix  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.test_viz import check_image_map, expected_grids  # noqa: E402
from vlmfix.testing.conformance import questions_for  # noqa: E402
from vlmfix.testing.tiny import random_image  # noqa: E402
from vlmfix.viz.patches import GRID_FAMILIES  # noqa: E402

MERGED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "glm46v", "glm_ocr", "exaone4_5",
          "qwen2_5_omni_thinker", "ernie4_5_vl_moe", "hyperclovax_vision_v2", "cosmos3_edge",
          "cohere_compass", "kimi_k25", "muse_glimmer", "muse_spark", "dots3_note", "minimax_m3_vl",
          "llava_onevision1_5")
SQUARE = ("paligemma", "gemma3", "internvl", "qianfan_ocr", "aya_vision", "idefics3", "smolvlm")  # square tiles


def expected(family: str, config, inputs, row: int, values: np.ndarray, images: int, pictures: list) -> dict:
    """{(image, kind): [rows, cols] values} of one row, from the processor's outputs."""
    if family in ("llava", "vipllava", "video_llava"):
        return expected_grids("llava", config, inputs, row, values, images)
    if family in ("llava_next", "llava_next_video"):
        return expected_grids("llava_next", config, inputs, row, values, images)
    if family == "granite4_vision":
        return expected_grids(family, config, inputs, row, values, images)
    out, start = {}, 0
    for k in range(images):
        index = row * images + k
        if family in MERGED:
            merge = {"kimi_k25": lambda v: v.merge_kernel_size[0], "muse_glimmer": lambda v: v.merge_size,
                     "muse_spark": lambda v: v.merge_size}.get(family, lambda v: v.spatial_merge_size)(
                         config.vision_config)
            _, h, w = inputs["image_grid_thw"][index].tolist()
            shapes = [((k, "merged"), h // merge, w // merge, 0)]
        elif family == "fuyu":  # one run of patch tokens per patch row (|NEWLINE| between the runs)
            image = (inputs["input_ids"][row] == config.image_token_id).int()
            rows = int((image[1:] - image[:-1] == 1).sum() + image[0])  # runs: their starts
            shapes = [((k, "patches"), rows, len(values) // rows, 0)]
        elif family == "video_llama_3":  # merged patches, each image's own merge size
            merge = int(inputs["image_merge_sizes"][index])
            _, h, w = inputs["image_grid_thw"][index].tolist()
            shapes = [((k, "merged"), h // merge, w // merge, 0)]
        elif family in ("hunyuan_vl", "hy_v4_vl"):  # rows of merged patches each with a newline (HunyuanOCR's
            ends = family == "hunyuan_vl"  # between a begin and an end token)
            merge = config.vision_config.spatial_merge_size
            _, h, w = inputs["image_grid_thw"][index].tolist()
            rows, cols = h // merge, w // merge
            block = values[start + ends : start + ends + rows * (cols + 1)].reshape(rows, cols + 1)
            out[(k, "merged")] = block[:, :cols]
            start += rows * (cols + 1) + 2 * ends
            continue
        elif family in ("gemma4", "gemma4_unified"):  # pooled patches: the patch extent read off the position ids
            positions = inputs["image_position_ids"][index]  # [patches, 2]: (x, y), -1 on padding
            cols, rows = (positions.max(0).values + 1).tolist()
            # Gemma 4 pools k x k patches; Gemma 4 Unified's positions are already its merged model patches
            kernel = config.vision_config.pooling_kernel_size if family == "gemma4" else 1
            shapes = [((k, "pooled"), rows // kernel, cols // kernel, 0)]
        elif family in ("mistral3", "mistral_large4", "lighton_ocr"):
            h, w = inputs["image_sizes"][index].tolist()
            step = config.vision_config.patch_size * config.spatial_merge_size
            shapes = [((k, "merged"), h // step, w // step, 0)]
        elif family == "perception_lm":  # a thumbnail, then tiles over a square canvas (the pictures are square)
            args = config.vision_config.model_args
            tile = args["img_size"] // args["patch_size"] // config.projector_pooling_ratio  # tokens a side of a view
            tiles = inputs["pixel_values"][index].shape[0] - 1
            rows = cols = math.isqrt(tiles)
            assert rows * cols == tiles and pictures[k].size[0] == pictures[k].size[1]
            out[(k, "thumbnail")] = values[start : start + tile * tile].reshape(tile, tile)
            start += tile * tile
            block = values[start : start + tiles * tile * tile].reshape(rows, cols, tile, tile)
            out[(k, "tiles")] = block.transpose(0, 2, 1, 3).reshape(rows * tile, cols * tile)
            start += tiles * tile * tile
            continue
        elif family == "step3p7":  # its tiles (the pictures are square: a square canvas), then its global view
            stride = config.vision_config.patch_size * 4  # two stride-2 convolutions after the patches
            tiles = int(inputs["num_local_patches"][index])
            if tiles:
                tile = inputs["pixel_values_local"].shape[-1] // stride
                rows = cols = math.isqrt(tiles)
                assert rows * cols == tiles
                block = values[start : start + tiles * tile * tile].reshape(rows, cols, tile, tile)
                out[(k, "tiles")] = block.transpose(0, 2, 1, 3).reshape(rows * tile, cols * tile)
                start += tiles * tile * tile
            side = inputs["pixel_values"].shape[-1] // stride
            shapes = [((k, "global" if tiles else "patches"), side, side, 0)]
        elif family == "llama4":  # its tiles (the pictures are square: a square canvas), then its global view
            vision = config.vision_config
            tile = int(vision.image_size // vision.patch_size * vision.pixel_shuffle_ratio)  # tokens a side of a view
            views = len(values) // images // (tile * tile)  # the row's pictures have one size
            if views > 1:  # tiles and a global view; a picture of one tile is that tile alone
                rows = cols = math.isqrt(views - 1)
                assert rows * cols == views - 1 and pictures[k].size[0] == pictures[k].size[1]
                block = values[start : start + rows * cols * tile * tile].reshape(rows, cols, tile, tile)
                out[(k, "tiles")] = block.transpose(0, 2, 1, 3).reshape(rows * tile, cols * tile)
                start += rows * cols * tile * tile
            shapes = [((k, "global" if views > 1 else "patches"), tile, tile, 0)]
        elif family == "molmo2":  # the low-resolution view, then the canvas, from the processor's image_grids
            low_h, low_w, high_h, high_w = inputs["image_grids"][index].tolist()
            shapes = [((k, "low_res"), low_h, low_w, 0), ((k, "canvas"), high_h, high_w, 0)]
        elif family == "apertus1p5":  # VQ codes, one per spatial_scale_factor^2 pixels of the resized picture
            h, w = inputs["image_sizes"][index].tolist()
            step = config.vision_config.spatial_scale_factor
            shapes = [((k, "codes"), h // step, w // step, 0)]
        elif family == "llava_onevision":
            side = config.vision_config.image_size // config.vision_config.patch_size
            size = inputs["image_sizes"][index]
            tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                           config.vision_config.image_size)
            rows, cols = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), size).shape[1:]
            assert rows * cols <= 9 * side * side  # below anyres_max_9: no shrinking
            out[(k, "base")] = values[start : start + side * side].reshape(side, side)
            start += side * side
            tiles = values[start : start + rows * (cols + 1)].reshape(rows, cols + 1)
            out[(k, "tiles")] = tiles[:, :cols]
            start += rows * (cols + 1)
            continue
        elif family in ("internvl", "qianfan_ocr", "aya_vision") and len(values) > images * 4:  # tiles + thumbnail
            per_image, tile = len(values) // images, 2  # 2 x 2 tokens per tile
            tiles = per_image // (tile * tile) - 1
            cols, rows = get_optimal_tiled_canvas(pictures[k].size[::-1], (32, 32), 1, 12)
            assert rows * cols == tiles
            block = values[start : start + tiles * tile * tile].reshape(rows, cols, tile, tile)
            out[(k, "tiles")] = block.transpose(0, 2, 1, 3).reshape(rows * tile, cols * tile)
            start += tiles * tile * tile
            shapes = [((k, "thumbnail"), tile, tile, 0)]
        else:
            per_image = len(values) // images
            side = math.isqrt(per_image)
            assert side * side == per_image
            shapes = [((k, "patches"), side, side, 0)]
        for key, rows, cols, _ in shapes:
            out[key] = values[start : start + rows * cols].reshape(rows, cols)
            start += rows * cols
    assert start == len(values)
    return out


@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_every_family_draws_pai_gain_on_its_grid_and_vhr_head_map(family: str):
    tiny = tiny_model(family)
    # Fuyu's processor pairs each prompt with one image; HY V4 VL's own forward (transformers 5.25's get_rope_index)
    # takes back-to-back images as one block of positions and fails on them
    images = 1 if family in ("fuyu", "hy_v4_vl") else 2
    inputs = tiny.inputs(list(questions_for(tiny)), images_per_row=images)  # one length where padding is refused
    with vlmfix.apply(tiny.model, vlmfix.PAI(cfg=False), vlmfix.VHR(), tokenizer=tiny.processor,
                      record=True) as session:
        session.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = session.report()
    for row in range(2):
        gain = np.asarray(report["pai"]["image_gain"][row])
        # the boost moved the image keys' attention (averaged over heads and layers a row's gains may all fall
        # below 1: each head's softmax shifts towards the image keys its boost favours most)
        assert gain.shape == (len(session.prompt_record()["image_positions"][row]),) and (gain != 1).any()
        pictures = [random_image(48 + 16 * (row % 3), row + 1000 * k) for k in range(images)]  # as tiny.inputs
        figure = session.plot(row=row, images=pictures)
        check_image_map(figure, "pai.image_gain",
                        expected(family, tiny.model.config, inputs, row, gain, images, pictures))
        layers = report["vhr"]["rows"][row]["layers"]  # the head map: VHR's divergence, layer by layer
        shown = next(ax for ax in figure.axes if ax.get_gid() == "vhr.vhd").images[-1].get_array()
        widest = max(len(layers[k]["vhd"]) for k in layers)  # sliding layers may have fewer heads: NaN past them
        np.testing.assert_allclose(np.ma.filled(shown.astype(float), np.nan),
                                   np.array([layers[k]["vhd"] + [np.nan] * (widest - len(layers[k]["vhd"]))
                                             for k in sorted(layers)]), equal_nan=True)
        figure.canvas.draw()  # renders without error


def test_every_supported_family_has_a_grid_or_a_named_refusal():
    from vlmfix.adapters import SUPPORTED_CLASSES
    from vlmfix.viz.patches import REFUSED, row_layouts

    families = {adapter.family for adapter in SUPPORTED_CLASSES.values()}
    assert families == set(GRID_FAMILIES) | set(REFUSED), families ^ (set(GRID_FAMILIES) | set(REFUSED))
    assert not set(GRID_FAMILIES) & set(REFUSED)
    for family in REFUSED:
        with pytest.raises(ValueError, match=f"cannot place {family}.s image tokens on its images: .+"):
            row_layouts(family, None, [16])
