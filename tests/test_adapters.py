"""The generic adapter path finds each family's parts from the common layout, and every class of
transformers' image-text-to-text mapping is either supported or refused with a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import vlmfix
from vlmfix.adapters import REFUSED, SUPPORTED_CLASSES, get_adapter
from vlmfix.adapters.refusals import CROSS_ATTENTION

from .conftest import tiny_model


def test_every_mapping_class_is_supported_or_refused_with_a_reason():
    classes = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    unhandled = sorted(c for c in classes if c not in SUPPORTED_CLASSES and c not in REFUSED)
    assert not unhandled, f"neither supported nor refused (add an adapter or a refusal with its reason): {unhandled}"
    both = sorted(set(SUPPORTED_CLASSES) & set(REFUSED))
    assert not both, f"supported and refused at once: {both}"
    stale = sorted(set(REFUSED) - classes)
    assert not stale, f"refusals for classes the mapping no longer has: {stale}"
    assert all(len(REFUSED[c].reason) > 20 for c in REFUSED)


def test_a_refused_class_names_its_reason():
    mllama = type("MllamaForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(vlmfix.UnsupportedModelError, match="does not run MllamaForConditionalGeneration: images "
                                                           "enter the language model through cross-attention"):
        vlmfix.apply(mllama)
    assert CROSS_ATTENTION in REFUSED["MllamaForConditionalGeneration"].reason


def test_an_unknown_class_lists_the_supported_ones():
    with pytest.raises(vlmfix.UnsupportedModelError, match="no adapter for Linear. Supported model classes: "):
        get_adapter(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_common_layout_finds_each_part(family):
    tiny = tiny_model(family)
    model, adapter = tiny.model, get_adapter(tiny.model)
    inner = model.model
    assert adapter.language_model is inner.language_model
    assert adapter.decoder_layers is inner.language_model.layers
    assert adapter.text_config is model.config.text_config
    assert adapter.image_token_ids == (model.config.image_token_id,)
    tokenizer = tiny.tokenizer
    if family == "llava":
        assert adapter.projector is inner.multi_modal_projector
        assert adapter.vision_tower is inner.vision_tower
        assert adapter.frame_token_ids == ()
        assert adapter.rope_sections == 1
        assert adapter.saved_state() == {}
    else:
        assert adapter.projector is inner.visual.merger
        assert adapter.vision_layers is inner.visual.blocks
        assert adapter.frame_token_ids == tuple(tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"]))
        assert adapter.rope_sections == 3
        assert set(adapter.saved_state()) == {"rope_deltas"}


def test_the_common_layout_reads_the_newer_families_variants():
    """Rotary parameters per layer type (Cohere Compass) and 4-axis M-RoPE (HunYuanVL) give the position rows
    the model takes; a `projector` on the model (Cosmos3-Edge) and a vision tower's `patch_merger` (HunYuanVL) are
    projectors; Ovis2's visual indicator ids wrap its images."""
    from vlmfix.testing import build_tiny

    compass = build_tiny("cohere_compass", layers=2)
    rope = compass.model.config.text_config.rope_parameters
    assert "mrope_section" not in rope and get_adapter(compass.model).rope_sections == 3  # one dict per layer type
    hunyuan = build_tiny("hunyuan_vl", layers=2)
    assert len(hunyuan.model.config.text_config.rope_parameters["mrope_section"]) == 4
    assert get_adapter(hunyuan.model).rope_sections == 4
    assert get_adapter(hunyuan.model).projector is hunyuan.model.model.vision_tower.patch_merger
    cosmos = build_tiny("cosmos3_edge", layers=2)
    assert get_adapter(cosmos.model).projector is cosmos.model.model.projector
    ovis = build_tiny("ovis2", layers=2)
    indicators = ovis.tokenizer.convert_tokens_to_ids(["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>",
                                                       "<IMG_END>"])
    assert get_adapter(ovis.model).frame_token_ids == tuple(indicators)


def test_a_frame_token_the_tokenizer_lacks_is_skipped_not_read_as_unknown():
    """EXAONE 4.5 names <vision> and </vision>; a tokenizer without one of them must neither fail nor mark its
    <unk> tokens (an unknown word of the question) as image frames."""
    from vlmfix.testing import build_tiny

    tiny = build_tiny("exaone4_5", layers=2)
    adapter = get_adapter(tiny.model)
    inputs = tiny.inputs(["Is there a dog?"])  # "Is" is not in the tiny vocabulary: an <unk> in the question
    ids = inputs["input_ids"]
    unknown = tiny.tokenizer.unk_token_id
    assert bool((ids == unknown).any())
    spans = adapter.spans(ids, inputs["attention_mask"], tiny.tokenizer)
    assert bool(spans.instruction[ids == unknown].all())  # the unknown word is part of the question
    closing = tiny.tokenizer.convert_tokens_to_ids("</vision>")
    assert not bool(spans.instruction[ids == closing].any())  # the frame is not

    class Lacking(type(adapter)):  # type: ignore[misc]  # the family's adapter, naming a token the vocabulary lacks
        frame_tokens = ("<vision>", "<|not_in_vocab|>")

    lacking = Lacking(tiny.model)
    assert lacking.named_frame_ids(tiny.tokenizer) == [tiny.tokenizer.convert_tokens_to_ids("<vision>")]
    again = lacking.spans(ids, inputs["attention_mask"], tiny.tokenizer)
    assert bool(again.instruction[ids == unknown].all())


def test_several_image_ids_all_count_as_image_tokens():
    tiny = tiny_model("llava")
    config = tiny.model.config
    config.image_token_ids = [config.image_token_id, 7]  # a family with two placeholder ids
    adapter = get_adapter(tiny.model)
    ids = torch.tensor([[5, config.image_token_id, 7, 9]])
    assert adapter.image_mask(ids).tolist() == [[False, True, True, False]]
    assert adapter.image_token_id == config.image_token_id


def test_every_supported_family_has_a_tiny_build():
    """So the conformance suite covers every family vlmfix claims to run."""
    from vlmfix.adapters import ADAPTERS
    from vlmfix.testing import ALL_FAMILIES

    assert sorted(a.family for a in ADAPTERS) == sorted(ALL_FAMILIES)


def test_the_common_layout_reads_the_families_of_transformers_5_24():
    """Gemma 4's `embed_vision` and ERNIE 4.5 VL's `resampler_model` are projectors; the image-free copy of a
    prompt drops Aria's pixel_mask and DeepSeek-VL hybrid's high-resolution pixels with the image, and gives ERNIE's
    expert routing ids the text type; the Qwen2.5-Omni thinker's image is framed by its vision bos / eos."""
    from vlmfix.testing import build_tiny

    gemma4 = build_tiny("gemma4", layers=2)
    assert get_adapter(gemma4.model).projector is gemma4.model.model.embed_vision
    ernie = build_tiny("ernie4_5_vl_moe", layers=2)
    assert get_adapter(ernie.model).projector is ernie.model.model.resampler_model
    inputs = ernie.inputs(["is there a dog ?"])
    assert bool(inputs["moe_mm_token_type_ids"].any())
    text_only = get_adapter(ernie.model).without_image(inputs, ernie.tokenizer.pad_token_id)
    assert not bool(text_only["moe_mm_token_type_ids"].any())
    assert text_only["moe_mm_token_type_ids"].shape == text_only["input_ids"].shape
    for family, key in (("aria", "pixel_mask"), ("deepseek_vl_hybrid", "high_res_pixel_values")):
        tiny = build_tiny(family, layers=2)
        inputs = tiny.inputs(["is there a dog ?"])
        assert key in inputs and key not in get_adapter(tiny.model).without_image(inputs, tiny.tokenizer.pad_token_id)
    omni = build_tiny("qwen2_5_omni_thinker", layers=2)
    frames = omni.tokenizer.convert_tokens_to_ids(["<|vision_bos|>", "<|vision_eos|>"])
    assert get_adapter(omni.model).frame_token_ids == tuple(frames)


def test_the_common_layout_reads_the_families_of_transformers_5_25():
    """LLaVA-OneVision-1.5's projector is its RICE-ViT tower's `merger` and its text positions are 1-D; Ovis2.5's is
    its visual tokenizer and embedding table (`multi_modal_projector`), its images are framed by the start and end
    tokens that take learned indicator embeddings (neither image nor instruction), and the image-free prompt drops
    them with the visual atoms."""
    from vlmfix.testing import build_tiny

    onevision = build_tiny("llava_onevision1_5", layers=2)
    adapter = get_adapter(onevision.model)
    assert adapter.vision_tower is onevision.model.model.visual
    assert adapter.projector is onevision.model.model.visual.merger
    assert adapter.vision_layers is onevision.model.model.visual.blocks
    assert adapter.rope_sections == 1  # Qwen3: plain 1-D positions, no M-RoPE
    frames = onevision.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert adapter.frame_token_ids == tuple(frames)

    ovis = build_tiny("ovis2_5", layers=2)
    adapter = get_adapter(ovis.model)
    assert adapter.projector is ovis.model.model.multi_modal_projector
    assert adapter.vision_layers is ovis.model.model.vision_tower.layers
    start, end, atom = ovis.tokenizer.convert_tokens_to_ids(["<ovis_image_start>", "<ovis_image_end>",
                                                             "<ovis_visual_atom>"])
    assert adapter.frame_token_ids == (start, end) and adapter.image_token_ids == (atom,)
    inputs = ovis.inputs(["is there a dog ?", "describe this picture"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    spans = adapter.spans(ids, mask, ovis.tokenizer)
    assert torch.equal(spans.image, ids == atom)
    boundary = (ids == start) | (ids == end)
    assert int(boundary.sum()) == 4 and not bool((spans.instruction | spans.image)[boundary].any())
    text_only = adapter.without_image(inputs, ovis.tokenizer.pad_token_id)
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only
    kept = text_only["input_ids"][text_only["attention_mask"].bool()]
    assert not bool(torch.isin(kept, torch.tensor([start, end, atom])).any())
    assert text_only["position_ids"].dim() == 2  # [batch, seq]: 1-D positions
