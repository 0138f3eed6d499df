"""Checks beyond the conformance suite (tests/test_conformance.py runs it on them too) for the families whose tiny
build needs torchvision or timm: PerceptionLM, FastVLM, Molmo2, Step 3.7, Kimi K2.5, Apertus 1.5.

Their tests carry the `torchvision` marker: the main CI lane deselects them, a second lane runs them beside
torchvision and timm. Selected without them, they fail at setup (tests/conftest.py), never skip.
"""

from __future__ import annotations

import pytest
import torch

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.edits import KeyBias
from vlmfix.testing import build_tiny
from vlmfix.testing import conformance as suite
from vlmfix.testing.tiny import random_image

from .conftest import GREEDY_STEP, PlannedEdits
from .reference_decoding import reference_abar, reference_noise

torchvision = pytest.mark.torchvision


# image tokens per image, from each family's layout (not from its processor): PerceptionLM's thumbnail and
# 2x2 tiles of 32 pixels, 8-pixel patches pooled 2x2; FastVLM's 128-pixel image downsampled 64x
TOKENS_PER_IMAGE = {"perception_lm": 5 * (32 // 8 // 2) ** 2, "fast_vlm": (128 // 64) ** 2}


@torchvision
@pytest.mark.parametrize("family", sorted(TOKENS_PER_IMAGE))
def test_image_spans_hold_the_layouts_token_count(family):
    tiny = build_tiny(family)
    inputs = tiny.inputs(list(suite.QUESTIONS), images_per_row=2)
    spans = get_adapter(tiny.model).spans(inputs["input_ids"], inputs["attention_mask"], tiny.tokenizer)
    assert spans.image.sum(dim=1).tolist() == [2 * TOKENS_PER_IMAGE[family]] * len(suite.QUESTIONS)


def zero_bias_scores(tiny, inputs) -> torch.Tensor:
    """First-step scores with a zero key bias in every layer: vlmfix's attention function runs everywhere (its
    mask, scaling, head layout and value width), and should change nothing."""
    zero_bias = PlannedEdits(lambda state, layer: [KeyBias(bias=torch.zeros_like(state.spans.image[:, None],
                                                                                  dtype=torch.float32))])
    with vlmfix.apply(tiny.model, zero_bias, tokenizer=tiny.processor) as session:
        scores = session.generate(**inputs, **GREEDY_STEP).scores[0]
    layers = get_adapter(tiny.model).num_layers
    assert session.report()[zero_bias.name]["applied"]["attention_calls"] == layers  # every layer ran vlmfix's
    return scores


@torchvision
@pytest.mark.parametrize("family", ["molmo2", "step3p7", "kimi_k25"])
def test_vlmfix_attention_in_every_layer_keeps_plain_scores(family):
    """Molmo2's bidirectional image blocks, Step 3.7's per-layer head counts and head gate, Kimi K2.5's latent
    attention (keys 24 wide, values 16): plain generate's scores, recomputed through vlmfix's attention."""
    tiny = build_tiny(family)
    inputs = tiny.inputs(list(suite.QUESTIONS))
    plain = tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
    torch.testing.assert_close(zero_bias_scores(tiny, inputs), plain, atol=1e-5, rtol=1e-4)


@torchvision
def test_molmo2_image_blocks_matter():
    """The check above has power for Molmo2: a causal-only prefill (no mm_token_type_ids) gives other scores, so a
    mask builder that dropped the bidirectional blocks would fail it."""
    tiny = build_tiny("molmo2")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    plain = tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
    causal = tiny.model.generate(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, **GREEDY_STEP)
    assert (plain - causal.scores[0]).abs().max() > 1e-3


@torchvision
def test_step3p7_heads_are_read_per_layer():
    """Step 3.7's sliding layers have twice the global layers' heads in the tiny build; the adapter reads each
    layer's count from its query projection's width, and `num_heads` is the global layers' count."""
    tiny = build_tiny("step3p7", heads=4, head_dim=16)
    adapter = get_adapter(tiny.model)
    types = tiny.model.config.text_config.layer_types
    widths = [adapter.attn(i).q_proj.out_features // 16 for i in range(adapter.num_layers)]
    assert [adapter.heads_in(i) for i in range(adapter.num_layers)] == widths
    assert widths == [8 if kind == "sliding_attention" else 4 for kind in types]
    assert adapter.num_heads == 4


@torchvision
def test_apertus1p5_image_tokens_are_the_placeholders_its_codes_fill():
    """One image token per 16x16 pixels of each image at its processed size (9 and 16 for the 48- and 64-pixel
    images), the placeholders the model scatters the embedded codes into; the row ends, the H*W header and the
    wrapping tokens are neither image nor instruction. The LM head keeps the text rows only, as released, so the
    model cannot write an image code (vlmfix treats it as an image reader, not an image generator)."""
    tiny = build_tiny("apertus1p5")
    config = tiny.model.config
    inputs = tiny.inputs(list(suite.QUESTIONS))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    spans = get_adapter(tiny.model).spans(ids, mask, tiny.tokenizer)
    sides = inputs["image_sizes"] // 16  # [images, 2] codes per column and row
    assert spans.image.sum(dim=1).tolist() == (sides[:, 0] * sides[:, 1]).tolist() == [9, 16]
    assert torch.equal(spans.image, ids == config.image_token_id)
    image_end = tiny.tokenizer.convert_tokens_to_ids("<|img_end|>")
    for row in range(ids.shape[0]):
        after_image = int((ids[row] == image_end).nonzero()[0]) + 1
        held = spans.instruction[row].nonzero().flatten().tolist()
        assert held[0] == after_image  # nothing of the image block (header, row ends) in the instruction
    assert tiny.model.lm_head.out_features == config.image_token_offset


@torchvision
def test_apertus1p5_vcd_noises_each_padded_image_at_its_own_size():
    """The processor pads a batch's pixels to its largest image (64 pixels here; the first image is 48). VCD's
    noise for an image is drawn at the image's own size and none falls on the padding, so the first image is noised
    exactly as when it is alone (the conformance suite's padded-vs-alone check failed without this)."""
    from vlmfix.methods.vcd import add_diffusion_noise

    tiny = build_tiny("apertus1p5")
    adapter = get_adapter(tiny.model)
    batch = tiny.inputs(list(suite.QUESTIONS))
    alone = tiny.inputs(list(suite.QUESTIONS[:1]))
    assert batch["pixel_values"].shape[-2:] == (64, 64) and alone["pixel_values"].shape[-2:] == (48, 48)
    noised = add_diffusion_noise(batch["pixel_values"], 500, 3, extents=adapter.pixel_extents(batch))
    noised_alone = add_diffusion_noise(alone["pixel_values"], 500, 3, extents=adapter.pixel_extents(alone))
    # the reference noise (VCD's schedule written out, eps from a CPU generator seeded 3) at the image's own size
    abar = reference_abar(500)
    first = batch["pixel_values"][0]
    expected = reference_noise(first[None, :, :48, :48], 500, 3)[0]
    torch.testing.assert_close(noised[0, :, :48, :48], expected)
    torch.testing.assert_close(noised_alone[0], expected)
    torch.testing.assert_close(noised[0, :, 48:], abar ** 0.5 * first[:, 48:])  # the padding: no noise
    with pytest.raises(ValueError, match=r"extents give 1 image sizes for pixel_values of shape \(2, 3, 64, 64\)"):
        add_diffusion_noise(batch["pixel_values"], 500, 3, extents=[(48, 48)])


@torchvision
def test_apertus1p5_loads_with_the_presets_attention_setting(tmp_path):
    """transformers 5.24 refuses attn_implementation="sdpa" for the whole model (the VQ image tokenizer has no SDPA
    path), so the preset leaves it null: the language model then gets SDPA. The tiny build asks for SDPA (or eager)
    on the language model only."""
    from benchmarks.models import load_pretrained

    for implementation in ("sdpa", "eager"):
        built = build_tiny("apertus1p5", attn_implementation=implementation)
        assert built.model.config.text_config._attn_implementation == implementation
    tiny = build_tiny("apertus1p5")
    tiny.model.save_pretrained(tmp_path / "apertus")
    tiny.processor.save_pretrained(tmp_path / "apertus")
    with pytest.raises(ValueError, match="Apertus1p5VisionTokenizerModel does not support an attention implementation "
                                         "through torch.nn.functional.scaled_dot_product_attention"):
        load_pretrained(str(tmp_path / "apertus"), torch_dtype="float32", device="cpu")
    loaded = load_pretrained(str(tmp_path / "apertus"), torch_dtype="float32", device="cpu", attn_implementation=None)
    assert loaded.model.config.text_config._attn_implementation == "sdpa"
    inputs = loaded.processor(text=[tiny.prompt("is there a dog ?")], images=[random_image(64, 1)], return_tensors="pt")
    expected = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)


@torchvision
def test_apertus1p5_dcd_refuses_naming_the_embedding_table(tmp_path):
    """DCD swaps an image projector; Apertus 1.5's codes go through the text embedding table, so DCD refuses it when
    the session is built, saying so (not an AttributeError at the first forward)."""
    tiny = build_tiny("apertus1p5")
    assert not get_adapter(tiny.model).has_projector
    with pytest.raises(vlmfix.UnsupportedModelError, match=r"DCD trains and swaps an image projector, and "
                       r"Apertus1p5ForConditionalGeneration has no image projector: its image codes are embedded by "
                       r"the language model's own embedding table"):
        vlmfix.apply(tiny.model, vlmfix.DCD(tmp_path), tokenizer=tiny.processor)
