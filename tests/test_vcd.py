"""VCD: noise schedule, seeded noise per image, the contrast in every decoding mode."""

from __future__ import annotations

import math

import pytest
import torch

import vlmfix
from vlmfix.decoding.edits import KeyBias
from vlmfix.methods.vcd import VCD, add_diffusion_noise, noise_schedule
from vlmfix.testing import TinyVLM

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import reference_abar, reference_noise
from .two_stream_reference import assert_scores_close, formula, last_logits

QUESTIONS = ["describe this image .", "is there a dog on the table ?"]


def test_noise_schedule_values():
    abar = noise_schedule()
    assert abs(math.sqrt(abar[500]) - 0.863) < 1e-3 and abs(math.sqrt(abar[999]) - 0.285) < 1e-3
    for t in (0, 250, 500, 999):
        assert abs(float(abar[t]) - reference_abar(t)) < 1e-9


def test_noise_is_seeded_and_per_image():
    pixels = tiny_model("llava").inputs(QUESTIONS)["pixel_values"]  # [2, 3, 32, 32]
    before = pixels.clone()
    noised = add_diffusion_noise(pixels, 500, seed=4)
    torch.testing.assert_close(noised, reference_noise(pixels, 500, 4), atol=1e-6, rtol=1e-6)
    assert torch.equal(noised, add_diffusion_noise(pixels, 500, seed=4))  # reproducible
    assert not torch.allclose(noised, add_diffusion_noise(pixels, 500, seed=5))
    # an image's noise does not depend on the rest of the batch
    assert torch.equal(add_diffusion_noise(pixels[1:], 500, seed=4), noised[1:])
    assert torch.equal(pixels, before)


def test_noise_on_flattened_patches_and_crops():
    qwen = tiny_model("qwen2_vl").inputs(QUESTIONS)
    pixels, grid = qwen["pixel_values"], qwen["image_grid_thw"]  # [patches, C*T*P*P], [2, 3]
    noised = add_diffusion_noise(pixels, 999, seed=1, image_grid_thw=grid)
    abar = reference_abar(999)
    for part, got in zip(pixels.split(grid.prod(-1).tolist()), noised.split(grid.prod(-1).tolist())):
        eps = torch.randn(part.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, math.sqrt(abar) * part + math.sqrt(1 - abar) * eps, atol=1e-6, rtol=1e-6)
    crops = tiny_model("llava_next").inputs(QUESTIONS)["pixel_values"]  # [2, crops, C, H, W]
    noised = add_diffusion_noise(crops, 500, seed=2)
    generator = torch.Generator().manual_seed(2)
    eps = torch.stack([torch.randn(crops.shape[2:], generator=generator) for _ in range(crops.shape[1])])
    expected = math.sqrt(reference_abar(500)) * crops + math.sqrt(1 - reference_abar(500)) * eps
    torch.testing.assert_close(noised, expected, atol=1e-6, rtol=1e-6)


def test_pixel_space_noise():
    pixels = tiny_model("llava").inputs(QUESTIONS)["pixel_values"]
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    noised = add_diffusion_noise(pixels, 500, seed=0, noise_space="pixel", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    raw = pixels * std[:, None, None] + mean[:, None, None]
    expected = (reference_noise(raw, 500, 0) - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(noised, expected, atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = {k: v.clone() for k, v in inputs.items()}
    plain = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[VCD(alpha=0.0, beta=None)], max_new_tokens=5,
                          do_sample=False)
    assert torch.equal(out, plain)
    for key, value in before.items():
        assert torch.equal(inputs[key], value)


def test_scores_equal_two_single_stream_runs():
    """VCD's greedy scores = (1 + a) l(clean) - a l(noised), cut by beta, from two independent plain runs."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    method = VCD(alpha=1.0, beta=0.1, noise_step=700, noise_seed=3)
    out = vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    noised = reference_noise(inputs["pixel_values"], 700, 3)
    for step, got in enumerate(out.logits):
        clean, noisy = (last_logits(tiny.model, inputs, tokens[:, :step], pixel_values=pixels)
                        for pixels in (inputs["pixel_values"], noised))
        assert_scores_close(got, formula(clean, noisy, 1.0, 0.1))
        assert torch.equal(got.argmax(-1), tokens[:, step])


def sam_inputs(tiny: TinyVLM) -> list[torch.Tensor]:
    """A list that fills with each `pixel_values` [images, 3, 64, 64] DeepSeek-VL hybrid's SAM tower runs on."""
    seen: list[torch.Tensor] = []
    tower = tiny.model.model.high_res_vision_model
    tower.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["pixel_values"].clone()),
                                    with_kwargs=True)
    return seen


def test_vcd_noises_both_towers_of_deepseek_vl_hybrid():
    """DeepSeek-VL hybrid reads each image twice: SigLIP `pixel_values` (32 pixels) and SAM `high_res_pixel_values`
    (64). The negative stream's SAM tower sees the high-res copy noised by the seed rule of pixel_values (its own eps
    at its own size), and VCD's greedy scores equal (1 + a) l(clean) - a l(noised) from two no-cache forwards with
    both copies noised; noising pixel_values alone gives other scores, so a clean high-res copy would show."""
    tiny = tiny_model("deepseek_vl_hybrid")
    inputs = tiny.inputs(QUESTIONS)
    before = {k: v.clone() for k, v in inputs.items()}
    seen = sam_inputs(tiny)
    with vlmfix.apply(tiny.model, VCD(alpha=1.0, beta=0.1, noise_step=700, noise_seed=3)) as session:
        out = session.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
        assert session.report()["vcd"]["noised"] == ["high_res_pixel_values", "pixel_values"]
    views = ("pixel_values", "high_res_pixel_values")
    clean = {key: inputs[key] for key in views}
    noised = {key: reference_noise(inputs[key], 700, 3) for key in views}
    assert len(seen) == 2  # generate encodes the clean images, the engine the noised ones, once each
    assert torch.equal(seen[0], clean["high_res_pixel_values"])
    torch.testing.assert_close(seen[1], noised["high_res_pixel_values"], atol=1e-6, rtol=1e-6)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    for step, got in enumerate(out.logits):
        plain, noisy, low_res_only = (
            last_logits(tiny.model, inputs, tokens[:, :step], **pixels)
            for pixels in (clean, noised, {**clean, "pixel_values": noised["pixel_values"]})
        )
        assert (noisy - low_res_only).abs().max() > 1e-3  # the high-res copy's noise changes the scores
        assert_scores_close(got, formula(plain, noisy, 1.0, 0.1))
    for key, value in before.items():
        assert torch.equal(inputs[key], value)


def test_pixel_space_noise_of_the_high_res_copy_uses_its_own_normalisation():
    """noise_space='pixel': the high-res copy is un-normalised with high_res_image_mean / std (not image_mean / std),
    noised in [0, 1] pixels and normalised again."""
    tiny = tiny_model("deepseek_vl_hybrid")
    inputs = tiny.inputs(QUESTIONS)
    seen = sam_inputs(tiny)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    method = VCD(noise_space="pixel", noise_step=600, noise_seed=1, high_res_image_mean=mean, high_res_image_std=std)
    vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=1, do_sample=False)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    raw = inputs["high_res_pixel_values"] * s + m
    torch.testing.assert_close(seen[-1], (reference_noise(raw, 600, 1) - m) / s, atol=1e-5, rtol=1e-5)


def test_greedy_applies_the_contrast():
    """Regression for the official code, where greedy silently skipped VCD."""
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[VCD(alpha=1.0, noise_step=999)], max_new_tokens=8,
                          do_sample=False)
    assert not torch.equal(out, plain)


def test_sampling_and_beams_run():
    tiny = tiny_model("qwen2_5_vl")
    inputs = tiny.inputs(QUESTIONS)
    torch.manual_seed(0)
    sampled = vlmfix.generate(tiny.model, **inputs, methods=["vcd"], do_sample=True, max_new_tokens=4)
    torch.manual_seed(0)
    again = vlmfix.generate(tiny.model, **inputs, methods=["vcd"], do_sample=True, max_new_tokens=4)
    assert torch.equal(sampled, again)
    beams = vlmfix.generate(tiny.model, **inputs, methods=[VCD()], num_beams=2, num_return_sequences=2,
                            max_new_tokens=4)
    assert beams.shape[0] == 4


def test_composes_with_an_attention_edit():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    layers_seen: list[tuple[int, int | None]] = []

    def bias(session, layer):
        layers_seen.append((layer, session.edited_rows))
        return [KeyBias(bias=2.0 * session.spans.image[:, None].float())]

    with vlmfix.apply(tiny.model, PlannedEdits(bias, layers=[0, 3]), VCD()) as session:
        session.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert session.report()["vcd"]["clean_weight"] == pytest.approx(0.863, abs=1e-3)
    assert {layer for layer, _ in layers_seen} == {0, 3}
    assert {rows for _, rows in layers_seen[-6:]} == {2}  # edits cover rows 0..B-1 of the 2B batch


def test_registry_and_validation():
    assert vlmfix.methods.get("vcd") is VCD
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0, got -1"):
        VCD(alpha=-1)
    with pytest.raises(ValueError, match=r"`beta` must be None or a finite number in \(0, 1\], got 1.5"):
        VCD(beta=1.5)
    with pytest.raises(ValueError, match=r"`noise_step` must be an int in \[0, 1000\), got 1000"):
        VCD(noise_step=1000)
    with pytest.raises(ValueError, match="`noise_space` must be one of 'normalized', 'pixel'"):
        VCD(noise_space="latent")
    # the high-res copy's default is transformers' DeepSeek-VL hybrid processor's, not image_mean / image_std
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    processor = DeepseekVLHybridImageProcessorPil()
    method = VCD(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert method.high_res_image_mean == pytest.approx(tuple(processor.high_res_image_mean))
    assert method.high_res_image_std == pytest.approx(tuple(processor.high_res_image_std))
    tiny = tiny_model("llava")
    with pytest.raises(vlmfix.SessionError, match="VCD is a two-stream method: call session.generate"):
        with vlmfix.apply(tiny.model, VCD()):
            tiny.model.generate(**tiny.inputs(QUESTIONS), max_new_tokens=2)
