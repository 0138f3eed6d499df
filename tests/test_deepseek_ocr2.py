"""DeepSeek-OCR-2 with tiled images: an image larger than a tile also comes as local views (`pixel_values_local`,
`num_local_patches`), which the conformance suite's small images never make. Their tokens, the rows of a batch with
and without tiles, and VCD's noise on every view."""

from __future__ import annotations

from typing import Any

import pytest

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.methods.vcd import VCD
from vlmfix.testing import TinyVLM
from vlmfix.testing import conformance as suite
from vlmfix.testing.tiny import random_image

from .conftest import tiny_model
from .reference_decoding import reference_noise
from .two_stream_reference import assert_scores_close, formula, last_logits

QUESTIONS = suite.QUESTIONS
# the tiny build's view: 96 pixels in 2-pixel SAM patches, downsampled 4 times a side by the neck's convolutions
VIEW_TOKENS = (96 // 2 // 4) ** 2  # 144: the model's smaller query table
SIDES = (200, 64)  # row 0: a square larger than a tile (the processor's 2x2 grid of tiles); row 1: one view


def tiled_inputs(tiny: TinyVLM, rows: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    prompts = [tiny.prompt(QUESTIONS[row]) for row in rows]
    images = [random_image(SIDES[row], row) for row in rows]
    return dict(tiny.processor(text=prompts, images=images, return_tensors="pt", padding=True))


def test_each_view_gives_its_queries_and_the_image_one_separator():
    tiny = tiny_model("deepseek_ocr2")
    inputs = tiled_inputs(tiny)
    assert inputs["num_local_patches"].tolist() == [4, 0]
    assert inputs["pixel_values_local"].shape == (4, 3, 96, 96)
    spans = get_adapter(tiny.model).spans(inputs["input_ids"], inputs["attention_mask"], tiny.tokenizer)
    want = [(1 + 4) * VIEW_TOKENS + 1, VIEW_TOKENS + 1]  # tiles, the global view, the separator
    assert spans.image.sum(dim=1).tolist() == want
    assert [suite.image_features(tiny, tiled_inputs(tiny, (row,))) for row in (0, 1)] == want


@pytest.mark.parametrize("method", ["vcd", "opera", "pai"])
def test_a_tiled_row_and_a_plain_row_decode_as_alone(method, tmp_path):
    """The two-stream engine (VCD) and OPERA's beams pick each row's tiles by `num_local_patches`; PAI edits
    the image tokens of both rows."""
    tiny = tiny_model("deepseek_ocr2")
    built = suite.build_method(method, tiny, tmp_path)
    batch = tiled_inputs(tiny)
    with vlmfix.apply(tiny.model, built, tokenizer=tiny.processor) as session:
        together = session.generate(**batch, max_new_tokens=3, do_sample=False, **suite.GENERATE_ARGS.get(method, {}))
    assert any(session.report()[built.name]["applied"].values())
    for row in (0, 1):
        alone_inputs = tiled_inputs(tiny, (row,))
        with vlmfix.apply(tiny.model, built, tokenizer=tiny.processor) as session:
            alone = session.generate(**alone_inputs, max_new_tokens=3, do_sample=False,
                                     **suite.GENERATE_ARGS.get(method, {}))
        assert suite.new_tokens(tiny, together, batch, row) == suite.new_tokens(tiny, alone, alone_inputs, 0)


def test_vcd_noises_the_tiles_with_the_global_view():
    """VCD's greedy scores equal (1 + a) l(clean) - a l(noised), cut by beta, where the noised stream has every view
    noised (the global views and the tiles), from two no-cache forwards of the plain model; noising the global views
    alone gives other scores, so clean tiles in the negative stream would show."""
    tiny = tiny_model("deepseek_ocr2")
    inputs = tiled_inputs(tiny)
    out = vlmfix.generate(tiny.model, **inputs, methods=[VCD(alpha=1.0, beta=0.1, noise_step=700, noise_seed=3)],
                          max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    noised = {key: reference_noise(inputs[key], 700, 3) for key in ("pixel_values", "pixel_values_local")}
    views = {key: inputs[key] for key in noised}
    local = {"num_local_patches": inputs["num_local_patches"]}
    for step, got in enumerate(out.logits):
        clean, noisy, global_only = (
            last_logits(tiny.model, inputs, tokens[:, :step], **pixels, **local)
            for pixels in (views, noised, {**views, "pixel_values": noised["pixel_values"]})
        )
        assert (clean - noisy).abs().max() > 1e-2  # the noised image matters, so a stream mix-up would show
        assert (noisy[0] - global_only[0]).abs().max() > 1e-3  # row 0's tiles change its scores
        assert_scores_close(got, formula(clean, noisy, 1.0, 0.1))
