"""The conformance suite on the families whose tiny build needs torchvision or timm (PerceptionLM, FastVLM, ...).

Their tests carry the `torchvision` marker: the main CI lane deselects them, a second lane runs them beside
torchvision and timm. Selected without them, they fail (build_tiny raises ImportError), never skip.
"""

from __future__ import annotations

import importlib.util

import pytest

from vlmfix.decoding.method import METHODS
from vlmfix.testing import TORCHVISION_FAMILIES, build_tiny
from vlmfix.testing import conformance as suite

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
    from vlmfix.adapters import get_adapter

    spans = get_adapter(tiny.model).spans(inputs["input_ids"], inputs["attention_mask"], tiny.tokenizer)
    assert spans.image.sum(dim=1).tolist() == [2 * TOKENS_PER_IMAGE[family]] * len(suite.QUESTIONS)


def test_a_build_without_torchvision_fails_with_the_fix(monkeypatch):
    """Not marked: runs in the main lane. A missing torchvision is an error naming the install, not a skip."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(ImportError, match="needs torchvision.*pip install torchvision timm"):
        build_tiny(TORCHVISION_FAMILIES[0])
