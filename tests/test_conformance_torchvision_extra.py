"""The conformance suite on the families whose tiny build needs torchvision or timm (PerceptionLM, FastVLM, ...).

Their tests carry the `torchvision` marker: the main CI lane deselects them, a second lane runs them beside
torchvision and timm. Selected without them, they fail (build_tiny raises ImportError), never skip.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.edits import KeyBias
from vlmfix.decoding.method import METHODS
from vlmfix.testing import TORCHVISION_FAMILIES, build_tiny
from vlmfix.testing import conformance as suite

from .conftest import PlannedEdits

torchvision = pytest.mark.torchvision


@torchvision
@pytest.mark.parametrize("mode", list(suite.MODES))
@pytest.mark.parametrize("family", TORCHVISION_FAMILIES)
def test_no_method_is_bit_identical_to_plain_generate(family, mode):
    suite.check_no_method(build_tiny(family), mode)


@torchvision
@pytest.mark.parametrize("images", [1, 2], ids=["one_image", "two_images"])
@pytest.mark.parametrize("family", TORCHVISION_FAMILIES)
def test_spans_follow_the_processor_and_the_chat_template(family, images):
    suite.check_spans(build_tiny(family), images_per_row=images)


@torchvision
@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("family", TORCHVISION_FAMILIES)
def test_every_method_runs_reports_and_keeps_rows_independent(family, method):
    outcome = suite.check_method(build_tiny(family), method)
    assert outcome.refused is None or len(outcome.refused) > 10  # a refusal says why


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


@torchvision
def test_molmo2_image_blocks_stay_bidirectional_in_edited_layers():
    """Molmo2's image blocks attend bidirectionally at prefill (mm_token_type_ids): an edit that changes nothing
    (a zero key bias, run by vlmfix's attention function in every layer) keeps plain generate's scores, which
    differ from those of a causal-only prefill, so a mask builder that dropped the blocks would be caught."""
    tiny = build_tiny("molmo2")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    kwargs = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = tiny.model.generate(**inputs, **kwargs).scores[0]
    causal_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    causal = tiny.model.generate(**causal_inputs, **kwargs).scores[0]
    assert (plain - causal).abs().max() > 1e-3  # the blocks reach the last prompt token
    zero_bias = PlannedEdits(lambda state, layer: [KeyBias(bias=torch.zeros_like(state.spans.image[:, None],
                                                                                  dtype=torch.float32))])
    with vlmfix.apply(tiny.model, zero_bias, tokenizer=tiny.processor) as session:
        edited = session.generate(**inputs, **kwargs).scores[0]
    layers = tiny.model.config.text_config.num_hidden_layers
    assert session.report()[zero_bias.name]["applied"]["attention_calls"] == layers  # every layer ran vlmfix's
    torch.testing.assert_close(edited, plain, atol=1e-5, rtol=1e-4)


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


def test_a_build_without_torchvision_fails_with_the_fix(monkeypatch):
    """Not marked: runs in the main lane. A missing torchvision is an error naming the install, not a skip."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(ImportError, match="needs torchvision.*pip install torchvision timm"):
        build_tiny(TORCHVISION_FAMILIES[0])
