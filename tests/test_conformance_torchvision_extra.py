"""Checks beyond the conformance suite (tests/test_conformance.py runs it on them too) for the families whose tiny
build needs torchvision or timm: PerceptionLM, FastVLM, Molmo2, Step 3.7, Kimi K2.5.

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

from .conftest import PlannedEdits

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


GREEDY_STEP = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)


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
