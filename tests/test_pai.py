"""PAI against plain-PyTorch references: the z + alpha*|z| rule, the image-free refinement, batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.edits import HeadScale, KeyBias, edited_attention
from vlmfix.methods.pai import PAI

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import (
    QUESTIONS,
    RowEdit,
    assert_batch_rows_equal_rows_alone,
    assert_unchanged,
    grown,
    image_free_logits,
    image_positions,
    keys_of,
    plain_softmax,
    reference_greedy,
    reference_logits,
    refined_reference,
    snapshot,
    vlmfix_greedy,
)

# ---------------------------------------------------------------------------------------------
# the rule on hand-checkable numbers


def test_golden_boost_on_one_row():
    """z = [2, -1, 0.5, -3] with image keys 1 and 2, alpha 0.5: z' = [2, -0.5, 0.75, -3] (a negative
    logit moves up, by the factor 1 - alpha; a positive one by 1 + alpha)."""
    d = 4
    z = torch.tensor([2.0, -1.0, 0.5, -3.0])
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 4, d)
    k[0, 0, :, 0] = z * math.sqrt(d)  # scores q.k / sqrt(d) = z
    v = torch.eye(4)[None, None]  # output = the probabilities
    image = torch.tensor([[False, True, True, False]])
    edit = KeyBias(abs_gain=image[:, None].float() * 0.5, rows="last")
    out = edited_attention(q, k, v, None, None, [edit])[0, 0, 0]
    expected = torch.softmax(torch.tensor([2.0, -0.5, 0.75, -3.0]), dim=-1)
    torch.testing.assert_close(out, expected)
    # what PAI plans: the same gain on image keys only
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with vlmfix.apply(tiny.model, PAI(alpha=0.5, cfg=False)) as session:
        tiny.model(**inputs)
        planned = session.edits_for(2)[0].abs_gain
    assert torch.equal(planned, image_positions(tiny, inputs)[:, None].float() * 0.5)


def test_refinement_scores_golden_and_gamma_one():
    from vlmfix.methods.image_free import image_free_scores

    pos = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.05), math.log(0.05)]])
    neg = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.125), math.log(0.125)]])
    scores = image_free_scores(pos, neg, gamma=2.0, cutoff=0.1)
    # 2*(log .6 - log .25) + log .25, 2*(log .3 - log .5) + log .5; .05 < 0.1 * .6 -> -inf
    expected = torch.tensor(
        [
            [
                2 * math.log(0.6 / 0.25) + math.log(0.25),
                2 * math.log(0.3 / 0.5) + math.log(0.5),
                -math.inf,
                -math.inf,
            ]
        ]
    )
    torch.testing.assert_close(scores, expected)
    # gamma 1: exactly log p_img where plausible; the cutoff only removes tokens
    same = image_free_scores(pos, neg, gamma=1.0, cutoff=0.01)
    assert torch.equal(same, torch.log_softmax(pos, -1))
    cut = image_free_scores(pos, neg, gamma=1.0, cutoff=0.1)
    assert torch.equal(cut[:, :2], torch.log_softmax(pos, -1)[:, :2]) and cut[:, 2:].isinf().all()


# ---------------------------------------------------------------------------------------------
# on tiny models


def pai_row_edit(alpha: float, image: Tensor) -> RowEdit:
    """PAI's rule from the spec: z + alpha*|z| on image columns, then softmax."""

    def edit(layer_idx, b, z, allowed):
        boosted = keys_of(image[b], z.shape[-1])[None]
        return plain_softmax(torch.where(boosted, z + alpha * z.abs(), z), allowed)

    return edit


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_matches_reference_over_decode_steps(family):
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS)
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    before = snapshot(inputs)
    alpha = 4.0  # large, so the edit moves the logits far beyond the comparison tolerance
    tokens, logits = vlmfix_greedy(tiny.model, inputs, [PAI(alpha=alpha, cfg=False)], steps=4)
    ref_tokens, ref_logits = reference_greedy(
        tiny.model, inputs, {2, 3, 4}, pai_row_edit(alpha, image_positions(tiny, inputs)), steps=4
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # and the edit really changes the logits (by far more than the tolerance)
    plain = tiny.model(**inputs).logits[:, -1]
    assert (logits[0] - plain).abs().max() > 2e-3
    assert_unchanged(inputs, before)


def test_alpha_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(
        tiny.model, **inputs, methods=[PAI(alpha=0.0, cfg=False)], max_new_tokens=6, do_sample=False
    )
    assert torch.equal(ref, out)
    assert_unchanged(inputs, before)


def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    method = PAI(alpha=1.0, cfg=False)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    assert_batch_rows_equal_rows_alone(tiny, batch, [method])


def test_skip_first_token_boost_leaves_first_step_alone():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model(**inputs).logits[:, -1]
    _, boosted = vlmfix_greedy(tiny.model, inputs, [PAI(alpha=4.0, cfg=False)], steps=3)
    _, skipped = vlmfix_greedy(
        tiny.model, inputs, [PAI(alpha=4.0, cfg=False, skip_first_token_boost=True)], steps=3
    )
    torch.testing.assert_close(skipped[0], plain, atol=1e-6, rtol=1e-6)
    assert (boosted[0] - plain).abs().max() > 2e-3  # the first token *is* boosted by default
    # later steps are boosted: a reference that edits generated rows only
    _, ref_logits = reference_greedy(
        tiny.model, inputs, {2, 3}, pai_row_edit(4.0, image_positions(tiny, inputs)), steps=3, skip_first=True
    )
    torch.testing.assert_close(skipped, ref_logits, atol=1e-5, rtol=1e-5)


def test_report_and_custom_layers():
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, PAI(alpha=0.3, layers=[1, 3], cfg=False)) as session:
        tiny.model.generate(**inputs, max_new_tokens=2)
        per_layer = {layer: session.edits_for(layer) for layer in range(5)}
    report = session.report()["pai"]
    assert report["layers"] == [1, 3]
    assert report["image_tokens"] == image_positions(tiny, inputs).sum(1).tolist()
    assert report["first_token_boosted"] is True and report["refinement"] is None
    assert [layer for layer, e in per_layer.items() if e] == [1, 3]


def test_composes_with_other_edits():
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((2, 4), 0.5))], layers=[1, 2])
    with vlmfix.apply(tiny.model, PAI(alpha=0.3, cfg=False), scale) as session:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kinds = {layer: [type(e).__name__ for e in session.edits_for(layer)] for layer in range(5)}
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert kinds == {0: [], 1: ["HeadScale"], 2: ["KeyBias", "HeadScale"], 3: ["KeyBias"], 4: ["KeyBias"]}


# ---------------------------------------------------------------------------------------------
# the image-free refinement (a batched second stream in the contrastive engine)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_refinement_matches_two_separate_streams(family):
    tiny = tiny_model(family, layers=5)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    alpha, gamma = 4.0, 1.6
    out = vlmfix.generate(
        tiny.model,
        **inputs,
        methods=[PAI(alpha=alpha, gamma=gamma)],
        tokenizer=tiny.processor,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_len:]
    edit = pai_row_edit(alpha, image_positions(tiny, inputs))
    for step in range(3):
        current = grown(inputs, tokens[:, :step])
        positive = reference_logits(tiny.model, current, {2, 3, 4}, edit, prompt_len - 1)[:, -1]
        want = refined_reference(positive, image_free_logits(tiny.model, current), gamma)
        got = out.logits[step]
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(want)], want[~torch.isinf(want)], atol=1e-4, rtol=1e-4)
        assert torch.equal(want.argmax(-1), tokens[:, step])
    assert_unchanged(inputs, before)


def test_gamma_one_scores_are_log_p_img_and_tokens_are_shared():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    seen: list[Tensor] = []
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone())
    )
    try:
        out = vlmfix.generate(
            tiny.model,
            **inputs,
            methods=[PAI(alpha=0.0, gamma=1.0)],
            tokenizer=tiny.processor,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        handle.remove()
    plain = tiny.model.generate(
        **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert torch.equal(out.sequences, plain.sequences)  # alpha 0 and gamma 1: greedy tokens
    for got, logits in zip(out.logits, plain.logits):
        log_p = logits.log_softmax(-1)
        keep = log_p >= math.log(0.1) + log_p.max(-1, keepdim=True).values  # the cutoff only removes tokens
        torch.testing.assert_close(got[keep], log_p[keep], atol=1e-5, rtol=1e-5)
        assert got[~keep].isinf().all()
    decode = [ids for ids in seen if ids.shape[1] == 1]
    assert decode and all(
        ids.shape[0] == 4 and torch.equal(ids[:2], ids[2:]) for ids in decode
    )  # [B image; B free]


def test_refinement_batch_rows_equal_rows_alone():
    tiny = tiny_model("qwen2_vl")
    method = PAI(alpha=1.0, gamma=1.4)
    assert_batch_rows_equal_rows_alone(tiny, tiny.inputs(QUESTIONS), [method], tokenizer=tiny.processor)


def test_refinement_needs_the_engine_and_matching_streams():
    tiny = tiny_model("llava")
    with pytest.raises(vlmfix.SessionError, match="PAI is a two-stream method: call session.generate"):
        with vlmfix.apply(tiny.model, PAI()):
            tiny.model.generate(**tiny.inputs(["what"]), max_new_tokens=1)
    assert PAI().contrastive and not PAI(cfg=False).contrastive
    with pytest.raises(ValueError, match=r"must have the same shape \[batch, vocab\]"):
        PAI().combine(None, torch.zeros(2, 5), torch.zeros(4, 5), 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=-0.1), r"`alpha` must be a finite number >= 0, got -0.1"),
        (dict(gamma=0.5), r"`gamma` must be a finite number >= 1, got 0.5"),
        (dict(plausibility=0.0), r"`plausibility` must be a finite number in \(0, 1\], got 0.0"),
        (dict(layers=[2, 2]), r"`layers` must be None or distinct 0-based layer indices, got \[2, 2\]"),
        (dict(layers="2-5"),
         r"`layers` must be None or a non-empty list of 0-based layer indices, got '2-5' \(a str\)"),
        (dict(cfg="yes"), r"`cfg` must be True or False"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PAI(**kwargs)


def test_layer_out_of_range_names_the_model_depth():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with pytest.raises(ValueError, match=r"`layers` holds \[7\], but the language model has 4 layers"):
        vlmfix.generate(tiny.model, **inputs, methods=[PAI(layers=[1, 7], cfg=False)], max_new_tokens=1)
