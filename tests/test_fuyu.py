"""Fuyu and Granite 4 Vision: spans of Fuyu's processor-written prompt, and two-stream methods on image features that
are not a `pooler_output` (Fuyu's patch embeddings, Granite's features added inside decoder layers)."""

from __future__ import annotations

import math

import pytest
import torch

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.opera import beam_image_features
from vlmfix.decoding.prompt_inputs import FEATURES
from vlmfix.eval.generation import chat_prompt
from vlmfix.methods.vcd import VCD, add_diffusion_noise, noise_schedule

from .conftest import tiny_model
from .reference_decoding import reference_noise
from .two_stream_reference import assert_scores_close, formula, last_logits

QUESTIONS = ["describe this image .", "is there a dog on the table ?"]


def test_spans_of_the_processor_written_prompt():
    """`[pad] S S N S S N <s> ▁ is there a dog ? <0x04>`: image = the S, frames = each row's N, the instruction
    runs from ▁ to the answer marker (without <s>)."""
    tiny = tiny_model("fuyu")
    adapter = get_adapter(tiny.model)
    tok = tiny.tokenizer
    S, N, bos, pad = (tok.convert_tokens_to_ids(t) for t in ("|SPEAKER|", "|NEWLINE|", "<s>", "<pad>"))
    words = tok.encode("is there a dog ?<0x04>", add_special_tokens=False)  # ▁ is there a dog ? <0x04>
    ids = torch.tensor([[pad, S, S, N, S, S, N, bos, *words]])
    mask = (ids != pad).long()
    spans = adapter.spans(ids, mask, tok)
    assert spans.image[0].nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert adapter.image_frame_mask(ids)[0].nonzero().flatten().tolist() == [3, 6]
    assert spans.instruction[0].nonzero().flatten().tolist() == list(range(8, 8 + len(words) - 1))
    assert tok.convert_ids_to_tokens(ids[0, 8:9].tolist()) == ["\u2581"]


def test_the_processor_prompt_gives_one_image_token_per_patch():
    tiny = tiny_model("fuyu")
    inputs = tiny.inputs(QUESTIONS)
    spans = get_adapter(tiny.model).spans(inputs["input_ids"], inputs["attention_mask"], tiny.tokenizer)
    assert spans.image.sum(dim=1).tolist() == [16, 16]  # 32 x 32 pixels in 8-pixel patches
    assert inputs["pixel_values"].shape == (32, 3 * 8 * 8)  # the batch's patches, in order


def test_beam_features_are_repeated_only_where_generate_left_them_per_item():
    """generate leaves Fuyu's `last_hidden_state` unexpanded; already expanded features are kept as they are."""
    tiny = tiny_model("fuyu")
    inputs = tiny.inputs(QUESTIONS)
    with torch.no_grad():
        encoded = tiny.model.base_model.get_image_features(inputs["pixel_values"], return_dict=True)
    rows = inputs["input_ids"].repeat_interleave(3, dim=0)  # 2 items x 3 beams
    image_mask = get_adapter(tiny.model).image_mask(rows)
    kwargs = beam_image_features({FEATURES: {"image": encoded}}, 3, image_mask)
    features = kwargs[FEATURES]["image"].last_hidden_state  # [6 * 16, hidden]
    first, second = encoded.last_hidden_state[:16], encoded.last_hidden_state[16:]
    assert torch.equal(features, torch.cat([first, first, first, second, second, second]))
    again = beam_image_features(kwargs, 3, image_mask)
    assert again[FEATURES]["image"] is kwargs[FEATURES]["image"]


@pytest.mark.parametrize("family", ["fuyu", "granite4_vision"])
def test_vcd_scores_equal_two_plain_forwards(family):
    """The engine stacks the noised stream's image features (Fuyu's `last_hidden_state`, Granite's layer pairs)
    under the clean ones: VCD's greedy scores equal (1 + a) l(clean) - a l(noised), cut by beta, from two no-cache
    forwards of the plain model."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = {k: v.clone() for k, v in inputs.items()}
    method = VCD(alpha=1.0, beta=0.1, noise_step=700, noise_seed=3)
    out = vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=3, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    patches = [16, 16] if family == "fuyu" else None  # Fuyu: a run of 16 patches (32 x 32 in 8 x 8) a prompt
    noised = reference_noise(inputs["pixel_values"], 700, 3, patches)
    sizes = {k: v for k, v in inputs.items() if k == "image_sizes"}
    for step, got in enumerate(out.logits):
        clean, noisy = (last_logits(tiny.model, inputs, tokens[:, :step], pixel_values=pixels, **sizes)
                        for pixels in (inputs["pixel_values"], noised))
        assert (clean - noisy).abs().max() > 1e-2  # the noised image matters, so a stream mix-up would show
        assert_scores_close(got, formula(clean, noisy, 1.0, 0.1))
    for key, value in before.items():
        assert torch.equal(inputs[key], value)


def test_the_legacy_patch_key_gets_a_clear_error_from_two_stream_methods():
    tiny = tiny_model("fuyu")
    inputs = tiny.inputs(QUESTIONS)
    legacy = {**{k: v for k, v in inputs.items() if k != "pixel_values"}, "image_patches": inputs["pixel_values"]}
    with pytest.raises(ValueError, match="return_legacy_image_output=False"):
        vlmfix.generate(tiny.model, **legacy, methods=[VCD()], max_new_tokens=2)


def test_benchmark_prompts_are_the_bare_text_for_a_processor_without_chat_template():
    tiny = tiny_model("fuyu")
    assert chat_prompt(tiny.processor, "is there a dog ?") == "is there a dog ?"


def test_vcd_noises_each_image_of_a_patch_run_on_its_own():
    """Fuyu's pixels are one [patches, 3 * 8 * 8] run: each image's patches get their own noise (not one vector
    repeated on every patch), the same as the image alone."""
    tiny = tiny_model("fuyu")
    inputs = tiny.inputs(QUESTIONS)
    grid = get_adapter(tiny.model).patch_grid(inputs["input_ids"])
    assert grid.tolist() == [[1, 1, 16], [1, 1, 16]]
    noised = add_diffusion_noise(inputs["pixel_values"], 999, 3, image_grid_thw=grid)
    torch.testing.assert_close(noised, reference_noise(inputs["pixel_values"], 999, 3, [16, 16]), atol=1e-6, rtol=1e-6)
    noise = noised - math.sqrt(float(noise_schedule()[999])) * inputs["pixel_values"]
    assert not torch.allclose(noise[0], noise[1])  # patches of one image differ
    assert torch.allclose(noise[:16], noise[16:])  # each image's noise is its own, from the same seed
    alone = tiny.inputs(QUESTIONS[1:], seed=1)
    alone_noised = add_diffusion_noise(alone["pixel_values"], 999, 3,
                                       image_grid_thw=get_adapter(tiny.model).patch_grid(alone["input_ids"]))
    assert torch.equal(alone_noised, noised[16:])
    with pytest.raises(ValueError, match="noise_space='normalized'"):
        vlmfix.generate(tiny.model, **inputs, methods=[VCD(noise_space="pixel")], max_new_tokens=2)
