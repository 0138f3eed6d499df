"""Session lifecycle, errors, adapters' spans and the no-image prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import vlmfix
from vlmfix.decoding.edits import KeyBias
from vlmfix.decoding.method import Method
from vlmfix.testing import FAMILIES, build_tiny

from .conftest import PlannedEdits, tiny_model


class NeedsImage(Method):
    name = "needs-image-test"
    needs_image = True


def registries() -> tuple[set, set]:
    return set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


def test_unsupported_model_lists_supported_classes():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(vlmfix.UnsupportedModelError, match="LlavaForConditionalGeneration.*Qwen2VLForCond"):
        vlmfix.apply(model)
    assert issubclass(vlmfix.UnsupportedModelError, ValueError)


def test_method_needing_image_on_row_without_image():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image .", "what is this ?"], with_image=[True, False])
    with pytest.raises(vlmfix.MissingImageError, match=r"rows \[1\] have no image"):
        vlmfix.generate(tiny.model, **inputs, methods=[NeedsImage()], max_new_tokens=2)


def test_caller_spans_out_of_range():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image .", "what"])
    seq = inputs["input_ids"].shape[1]
    method = PlannedEdits(lambda s, layer: [])
    with pytest.raises(vlmfix.SpanError, match="outside the row's tokens"):
        vlmfix.generate(tiny.model, **inputs, methods=[method], spans={"instruction": [[seq + 3], [seq - 1]]},
                        max_new_tokens=2)
    # a padding position is out of range too
    with pytest.raises(vlmfix.SpanError, match="outside the row's tokens"):
        vlmfix.generate(tiny.model, **inputs, methods=[method], spans={"instruction": [[seq - 1], [0]]},
                        max_new_tokens=2)


def test_caller_spans_override_adapter():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["describe this image .", "what"])
    seq = inputs["input_ids"].shape[1]
    seen = {}

    def record(session, layer_idx):
        seen["instruction"] = session.spans.instruction.clone()
        return []

    vlmfix.generate(tiny.model, **inputs, methods=[PlannedEdits(record)],
                    spans={"instruction": [[seq - 2, seq - 1], [seq - 1]]}, max_new_tokens=1)
    assert seen["instruction"].sum(1).tolist() == [2, 1]
    assert seen["instruction"][0, seq - 2:].all()


def test_reentrant_apply_fails_clearly():
    tiny = tiny_model("llava")
    with vlmfix.apply(tiny.model):
        with pytest.raises(vlmfix.SessionError, match="already inside a vlmfix session"):
            with vlmfix.apply(tiny.model):
                pass
    with vlmfix.apply(tiny.model):  # usable again after the first one left
        pass


def test_unknown_method_name_lists_available():
    tiny = tiny_model("llava")
    with pytest.raises(vlmfix.UnknownNameError, match="Unknown method 'vhrr'. Available:"):
        vlmfix.apply(tiny.model, "vhrr")
    with pytest.raises(KeyError):
        vlmfix.methods.get("vhrr")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exception_inside_apply_restores_everything(attn):
    tiny = tiny_model("qwen2_vl", attn)
    model = tiny.model
    before_cfg = model.config.text_config._attn_implementation
    before_vision = model.config.vision_config._attn_implementation
    before_regs = registries()
    before_hooks = len(model._forward_pre_hooks)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny.inputs(["describe this image ."])
    with pytest.raises(RuntimeError, match="boom"):
        with vlmfix.apply(model, PlannedEdits(lambda s, layer: [KeyBias(bias=torch.ones(1, 1, 4))])) as session:
            assert model.config.text_config._attn_implementation.startswith("vlmfix")
            assert model.config.vision_config._attn_implementation == before_vision  # only the LM is pointed
            model.generate(**inputs, max_new_tokens=2)
            raise RuntimeError("boom")
    assert session.prompts_seen == 1
    assert model.config.text_config._attn_implementation == before_cfg
    assert registries() == before_regs
    assert len(model._forward_pre_hooks) == before_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_spans_follow_prompt_structure(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(["describe this image .", "is there a dog in the picture ?"])
    spans = vlmfix.get_adapter(tiny.model).spans(inputs["input_ids"], inputs["attention_mask"], tiny.tokenizer)
    ids = inputs["input_ids"]
    image_id = tiny.model.config.image_token_id
    assert torch.equal(spans.image, (ids == image_id) & inputs["attention_mask"].bool())
    for row, words in enumerate(["describe this image .", "is there a dog in the picture ?"]):
        assert tiny.tokenizer.decode(ids[row][spans.instruction[row]]).split() == words.split()
    assert not (spans.image & spans.instruction).any()
    assert not (spans.other & ~spans.valid).any()


def test_without_image_matches_text_prompt_alone(family):
    """The no-image batch gives each row the logits of its text-only prompt run alone (positions right)."""
    tiny = tiny_model(family)
    adapter = vlmfix.get_adapter(tiny.model)
    questions = ["describe this image .", "is there a dog in the picture ?"]
    batch = adapter.without_image(tiny.inputs(questions), tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny.model(**batch).logits[:, -1]
        for row, question in enumerate(questions):
            text = tiny.processor(text=[tiny.prompt(question, with_image=False)], return_tensors="pt")
            alone = tiny.model(**dict(text)).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_round_trip(family, tmp_path):
    tiny = build_tiny(family)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is type(tiny.model)
    inputs = tiny.inputs(["describe this image ."])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tiny.model(**inputs).logits)
