"""The shared image-token selection (SID, AvisC) and the edit vocabulary's stream field."""

from __future__ import annotations

import pytest
import torch

import vlmfix
from vlmfix.decoding.edits import Edit, KeyBias, Reweight, stream_blocks
from vlmfix.methods.image_selection import (
    NewestRowAttention,
    above_mean_std,
    all_rows,
    image_indices,
    keep_counts,
    least_attended,
    most_attended,
    rows_without_context_before_image,
    top_p_layers,
)

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import QUESTIONS

# one row: BOS, six image tokens at positions 1..6, one text token
IMAGE = torch.tensor([[False, True, True, True, True, True, True, False]])


def test_least_attended_golden():
    # two heads' newest-row probabilities over the 8 keys; the head mean of image keys is
    # [0.20, 0.05, 0.10, 0.05, 0.15, 0.25] at positions 1..6
    heads = torch.tensor([[0.10, 0.30, 0.00, 0.20, 0.10, 0.10, 0.20, 0.00],
                          [0.00, 0.10, 0.10, 0.00, 0.00, 0.20, 0.30, 0.30]])
    scores = heads.mean(0, keepdim=True)
    count = keep_counts(IMAGE, 1 / 3, None)
    assert count.tolist() == [2]
    kept = least_attended(scores, IMAGE, count)
    # 0.05 at positions 2 and 4; the text keys (0.05 at 0, 0.15 at 7) are never candidates
    assert kept.tolist() == [[False, False, True, False, True, False, False, False]]
    assert image_indices(kept, IMAGE) == [[1, 3]]
    # three kept: the tie for third place (0.10 at position 3, none other) -> position 3
    assert least_attended(scores, IMAGE, torch.tensor([3])).nonzero()[:, 1].tolist() == [2, 3, 4]


def test_ties_go_to_the_lower_position():
    scores = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]])
    assert least_attended(scores, IMAGE, torch.tensor([2])).nonzero()[:, 1].tolist() == [1, 2]
    assert most_attended(scores, IMAGE, torch.tensor([2])).nonzero()[:, 1].tolist() == [1, 2]
    scores = torch.tensor([[0.0, 0.3, 0.1, 0.3, 0.2, 0.3, 0.0, 0.9]])
    assert most_attended(scores, IMAGE, torch.tensor([2])).nonzero()[:, 1].tolist() == [1, 3]


def test_rows_select_independently():
    image = torch.tensor([[True, True, True, False], [False, True, True, True]])
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 6.0]])
    assert least_attended(scores, image, torch.tensor([1, 2])).tolist() == [
        [False, True, False, False], [False, True, True, False]]
    assert most_attended(scores, image, torch.tensor([2, 0])).tolist() == [
        [True, False, True, False], [False, False, False, False]]


def test_keep_counts_round_half_up_and_clip():
    image = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    assert keep_counts(image, 0.25, None).tolist() == [2, 2]  # 1.5 -> 2, 2.0 -> 2
    assert keep_counts(image, 1.0, None).tolist() == [6, 8]
    assert keep_counts(image, 0.5, 7).tolist() == [6, 7]  # a count replaces the ratio, clipped per row


def test_above_mean_std_golden():
    # image scores 0.1, 0.1, 0.1, 0.7: mean 0.25, unbiased std sqrt((3 * 0.15^2 + 0.45^2) / 3) = 0.3
    image = torch.tensor([[False, True, True, True, True]])
    scores = torch.tensor([[5.0, 0.1, 0.1, 0.1, 0.7]])
    assert above_mean_std(scores, image, 1.0).tolist() == [[False, False, False, False, True]]  # >= 0.55
    assert above_mean_std(scores, image, -0.5).tolist() == [[False, True, True, True, True]]  # >= 0.10
    assert not above_mean_std(scores, image, 2.0).any()  # >= 0.85


def test_top_p_layers_golden():
    mass = torch.tensor([[0.1, 0.4, 0.3, 0.2], [1.0, 1.0, 2.0, 0.0]])
    # row 0 shares 0.1 0.4 0.3 0.2: sorted 0.4, 0.3 (cumulative 0.4 < 0.5, 0.7): 1 + 1 = 2 layers
    # row 1 shares 0.25 0.25 0.5 0: sorted 0.5 (cumulative 0.5, not < 0.5): 1 layer
    assert top_p_layers(mass, 0.5).tolist() == [[False, True, True, False], [False, False, True, False]]
    assert top_p_layers(mass, 1.0).sum(1).tolist() == [4, 3]  # every layer with mass (and one without: 1 + 3)


def test_rows_without_context_before_image():
    image = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    valid = torch.tensor([[False, True, True], [True, True, True], [True, True, True]])
    assert rows_without_context_before_image(image, valid) == [0, 1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_newest_row_attention_equals_eager_attention_weights(family):
    """The observer's head-mean row equals `output_attentions` of an eager forward, at the prefill (left-padded
    batch) and at the decode step of generate with a cache."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    seen: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    observer = NewestRowAttention(frozenset({0, 2}), all_rows,
                                  on_scores=lambda layer, scores: seen[layer].append(scores.clone()))
    with vlmfix.apply(tiny.model) as session, session.observing(observer):
        out = tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [len(calls) for calls in seen.values()] == [2, 2]  # the prefill and one decode step
    tiny.model.set_attn_implementation("eager")
    token = out[:, -2:-1]  # the token fed at the decode step
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1))
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], 1)
    if family == "llava":  # generate's positions (Qwen derives its own)
        full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        eager = tiny.model(**full, output_attentions=True, use_cache=False).attentions
    prompt = inputs["input_ids"].shape[1]
    for layer, (prefill, decode) in seen.items():
        want_prefill = eager[layer][:, :, prompt - 1, :prompt].float().mean(1)  # [B, P]
        torch.testing.assert_close(prefill, want_prefill, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode, eager[layer][:, :, -1].float().mean(1), atol=1e-5, rtol=1e-5)


def test_stream_blocks_golden():
    plain, negative, positive = KeyBias(), KeyBias(stream="negative"), Reweight(multiplier=torch.ones(1, 1, 1),
                                                                                 stream="positive")
    edits = [plain, negative, positive]
    # two-stream forward of 2 + 2 rows whose negative rows are not edited by default
    assert stream_blocks(edits, 4, 2, 2) == [(slice(0, 2), [plain, positive]), (slice(2, 4), [negative])]
    # ... whose default edits cover both streams (edit_negative)
    assert stream_blocks(edits, 4, None, 2) == [(slice(0, 2), [plain, positive]), (slice(2, 4), [plain, negative])]
    # one-stream forward: a negative-stream edit touches nothing
    assert stream_blocks(edits, 4, None, None) == [(slice(0, 4), [plain, positive])]
    assert stream_blocks([negative], 2, None, None) == [(slice(0, 2), [])]
    with pytest.raises(ValueError, match="stream must be None, 'positive' or 'negative', got 'both'"):
        Edit(stream="both")  # type: ignore[arg-type]


def test_a_negative_stream_edit_touches_no_row_of_a_one_stream_forward():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model(**inputs).logits

    def boost(stream, gain=5.0):
        return PlannedEdits(lambda session, layer: [KeyBias(bias=gain * session.spans.image[:, None].float(),
                                                            stream=stream)])

    outputs = {}
    for stream in (None, "positive", "negative"):
        with vlmfix.apply(tiny.model, boost(stream)), torch.no_grad():
            outputs[stream] = tiny.model(**inputs).logits
    torch.testing.assert_close(outputs["negative"], plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs["positive"], outputs[None])  # one stream: the positive rows are every row
    assert not torch.allclose(outputs[None], plain, atol=1e-3)
    with vlmfix.apply(tiny.model, boost(None), boost("negative", -5.0)), torch.no_grad():
        mixed = tiny.model(**inputs).logits
    assert torch.equal(mixed, outputs[None])  # beside another method's edit, too
