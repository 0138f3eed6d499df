"""The conformance suite on every family with a tiny build, and every registered method."""

from __future__ import annotations

import pytest

from vlmfix.decoding.method import METHODS
from vlmfix.errors import PaddedBatchError
from vlmfix.testing import ALL_FAMILIES, build_tiny
from vlmfix.testing import conformance as suite
from vlmfix.testing.tiny_feature_families import SINGLE_IMAGE

# two images per prompt where the family's processor takes them (Fuyu's pairs each prompt with one image)
SPAN_CASES = [(family, images) for family in ALL_FAMILIES for images in (1, 2)
              if images == 1 or family not in SINGLE_IMAGE]


@pytest.mark.parametrize("mode", list(suite.MODES))
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_no_method_is_bit_identical_to_plain_generate(family, mode):
    suite.check_no_method(build_tiny(family), mode)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_tiny_build_reads_its_image(family):
    suite.check_image_matters(build_tiny(family))


def test_a_build_that_ignores_its_image_is_caught():
    """The image check is not a stub: with the projector's output zeroed, every image gives the same logits."""
    tiny = build_tiny("llava")
    projector = tiny.model.model.multi_modal_projector.linear_2
    projector.weight.data.zero_()
    projector.bias.data.zero_()
    assert suite.image_effect(tiny) == 0.0
    with pytest.raises(suite.ConformanceError, match="ignores its image"):
        suite.check_image_matters(tiny)


@pytest.mark.parametrize(("family", "images"), SPAN_CASES)
def test_spans_follow_the_processor_and_the_chat_template(family, images):
    suite.check_spans(build_tiny(family), images_per_row=images)


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_method_runs_reports_and_keeps_rows_independent(family, method):
    outcome = suite.check_method(build_tiny(family), method)
    assert outcome.refused is None or len(outcome.refused) > 10  # a refusal says why


def test_the_mapping_has_no_unhandled_class(capsys):
    assert suite.main(["--list"]) == 0
    printed = capsys.readouterr().out
    assert " 0 unhandled" in printed.splitlines()[0]


def test_a_changed_model_is_caught():
    """The restoration check is not a stub: a left-over hook and a changed weight are both reported."""
    tiny = build_tiny("llava")
    snapshot = suite.ModelSnapshot.take(tiny.model)
    handle = tiny.model.register_forward_hook(lambda *a: None)
    with pytest.raises(suite.ConformanceError, match="1 hooks left"):
        snapshot.check(tiny.model, "in this test")
    handle.remove()
    next(tiny.model.parameters()).data[0] += 1
    with pytest.raises(suite.ConformanceError, match="weights changed"):
        snapshot.check(tiny.model, "in this test")


@pytest.mark.parametrize(("method", "by_engine", "refused"), [
    ("icd", True, True),  # its second prompt is longer by design: the engine's padding is a refusal
    ("icd", False, False),  # the one-length batch itself padded: a regression
    ("vhr", True, False),  # a method that pads by regression
])
def test_a_padded_batch_refusal_counts_only_for_a_longer_second_prompt(monkeypatch, method, by_engine, refused):
    """On a family run on unpadded batches only, `PaddedBatchError` (a subclass of UnsupportedModelError) is a
    refusal only where a method's second prompt is longer by design; anything else fails the check."""

    def padded(*args, **kwargs):
        raise PaddedBatchError("rows [0] of this prefill are left-padded", by_engine=by_engine)

    monkeypatch.setattr(suite, "_run_method", padded)
    tiny = build_tiny("llava")
    if refused:
        assert "left-padded" in (suite.check_method(tiny, method).refused or "")
    else:
        with pytest.raises(suite.ConformanceError, match=f"{method} left-padded the one-length batch"):
            suite.check_method(tiny, method)
