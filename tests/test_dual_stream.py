"""DualStream against independent references: token sets from eager vision attention, the boost rule,
head modulation, the image-free refinement, batching."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from transformers import AttentionInterface

import vlmfix
from vlmfix.decoding.edits import HeadScale
from vlmfix.methods.dual_stream import DualStream, top_k_mask, tukey_mask
from vlmfix.methods.gift import GIFT

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import (
    QUESTIONS,
    assert_batch_rows_equal_rows_alone,
    assert_unchanged,
    grown,
    image_free_logits,
    keys_of,
    plain_softmax,
    reference_greedy,
    reference_logits,
    refined_reference,
    snapshot,
)

SHAPE = dict(layers=5, heads=4)


def quiet(**kwargs: Any) -> DualStream:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the alpha > 0.5 warning
        return DualStream(**kwargs)


def single_stream(model: Any, inputs: dict, method: DualStream, **generate_kwargs: Any) -> tuple[Any, Any]:
    """cfg=False decoding through session.generate (which records the call's image inputs)."""
    with vlmfix.apply(model, method) as session:
        out = session.generate(**inputs, **generate_kwargs)
    return out, session


def tukey_reference(scores: Tensor) -> set[int]:
    values = scores.detach().double().numpy()
    q1, q3 = np.percentile(values, [25, 75])
    return {int(j) for j in np.nonzero(values > q3 + 1.5 * (q3 - q1))[0]}


def top_reference(scores: Tensor, count: int) -> set[int]:
    return {int(j) for j in np.argsort(-scores.detach().double().numpy(), kind="stable")[:count]}


# ---------------------------------------------------------------------------------------------
# selection rules on hand-made numbers


def test_top_k_and_tukey_on_synthetic_scores():
    scores = torch.tensor([0.10, 0.12, 0.11, 0.95, 0.13, 0.09, 0.12, 0.80, 0.11, 0.10, 0.14, 0.12])
    # quartiles (linear): Q1 = 0.1075, Q3 = 0.1275, fence = 0.1575 -> indices 3 and 7
    assert tukey_mask(scores).nonzero().flatten().tolist() == [3, 7]
    assert top_k_mask(scores, 3).nonzero().flatten().tolist() == [3, 7, 10]
    assert not tukey_mask(torch.full((8,), 0.3)).any()  # a flat map has no outliers
    # topk_ratio: the top-|Tukey set| tokens, the same set here
    method = DualStream(alpha=0.5, beta=0.3, summary_rule="topk_ratio", cfg=False)
    from vlmfix.methods.vision_attention import UnitScores

    local, summary = method._pick(UnitScores(local=scores.flip(0), summary=scores, spatial=None))
    assert summary.nonzero().flatten().tolist() == [3, 7]
    assert local.nonzero().flatten().tolist() == [1, 4, 8]  # top 3 of the flipped scores (ids 8, 4, 1)
    assert not (local & summary).any()


def test_spatial_stream_reads_column_sums():
    """Pitfall 3 of the spec: row sums of softmax rows are all 1 (a useless score); columns differ."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(
        torch.randn(4, 17, 17, generator=g) * 2, dim=-1
    )  # [heads, 1 + patches, 1 + patches]
    rows = probs.sum(-1).mean(0)[1:]
    cols = probs.sum(-2).mean(0)[1:]
    torch.testing.assert_close(rows, torch.ones(16))
    assert cols.std() > 0.1
    assert top_k_mask(cols, 3).nonzero().flatten().tolist() == sorted(top_reference(cols, 3))


# ---------------------------------------------------------------------------------------------
# token sets on tiny models, against eager attention probabilities


def clip_attentions(family: str, inputs: dict, shape: dict = SHAPE) -> tuple[Tensor, ...]:
    eager = tiny_model(family, attn="eager", **shape)
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: [images, crops, ...] -> every crop of every image
        pixels = pixels.flatten(0, 1)
    with torch.no_grad():
        return eager.model.model.vision_tower(pixels, output_attentions=True).attentions


BIG = dict(layers=5, heads=4, image_size=64)  # 64 patches per image


@pytest.mark.parametrize("summary_layer", [None, 1])
def test_llava_sets_match_eager_cls_attention(summary_layer):
    tiny = tiny_model("llava", **BIG)
    questions = [*QUESTIONS, "what"]
    inputs = tiny.inputs(questions)
    method = quiet(alpha=0.7, beta=0.4, summary_layer=summary_layer, spatial_ratio=0.125, cfg=False)
    _, session = single_stream(tiny.model, inputs, method, max_new_tokens=1)
    report = session.report()["dual_stream"]
    att = clip_attentions("llava", inputs, BIG)
    s_layer = 0 if summary_layer is None else summary_layer  # 2 vision layers, vision_feature_layer -2 -> 0
    found_summary = False
    for b in range(len(questions)):
        cls_local = att[0][b, :, 0, 1:].sum(0)  # [64]
        cls_summary = att[s_layer][b, :, 0, 1:].sum(0)
        spatial = att[0][b, :, :, 1:].sum(1).mean(0)  # attention received, column sums
        summary = tukey_reference(cls_summary)
        local = (top_reference(cls_local, 16) | top_reference(spatial, 8)) - summary
        row = report["rows"][b]
        assert set(row["summary_tokens"]) == summary
        assert set(row["local_tokens"]) == local
        found_summary |= bool(summary)
    assert found_summary, "the test images should give at least one summary token"
    assert report["selector"] == "CLS attention"


def qwen_received(family: str, inputs: dict) -> list[Tensor]:
    """Per vision block: attention each patch receives (mean over heads and its segment's queries), recorded
    from the model's own post-rotary q/k by an attention function registered for this test."""
    tiny = tiny_model(family, **SHAPE)
    visual = tiny.model.model.visual
    eager = AttentionInterface._global_mapping.get("sdpa")
    captured: dict[int, list[Tensor]] = {i: [] for i in range(len(visual.blocks))}
    block_of = {id(block.attn): i for i, block in enumerate(visual.blocks)}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * scaling, dim=-1)  # [1, H, n, n]
        captured[block_of[id(module)]].append(probs[0].sum(1).mean(0) / probs.shape[2])
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    AttentionInterface.register("dual-stream-test-record", record)
    old = visual.config._attn_implementation
    visual.config._attn_implementation = "dual-stream-test-record"
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        visual.config._attn_implementation = old
        AttentionInterface._global_mapping.pop("dual-stream-test-record", None)
    return [torch.cat(parts) for _, parts in sorted(captured.items())]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_substitute_matches_recorded_attention(family):
    tiny = tiny_model(family, **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    method = quiet(alpha=0.7, beta=0.4, cfg=False)
    _, session = single_stream(tiny.model, inputs, method, max_new_tokens=1)
    report = session.report()["dual_stream"]
    received = qwen_received(family, inputs)
    visual = tiny.model.model.visual
    order = None
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(
            inputs["image_grid_thw"],
            spatial_merge_size=2,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )

    def per_token(block: int) -> Tensor:
        merged = received[block].view(-1, 4).mean(-1)  # 2x2 merge groups
        if order is not None:
            unpermuted = torch.empty_like(merged)
            unpermuted[order] = merged  # block position i holds merged token order[i]
            merged = unpermuted
        return merged

    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    local_scores = per_token(0).split(counts)
    summary_scores = per_token(1).split(counts)  # the last (full-attention) block
    for b in range(2):
        summary = tukey_reference(summary_scores[b])
        local = top_reference(local_scores[b], math.floor(0.25 * counts[b])) - summary
        assert set(report["rows"][b]["summary_tokens"]) == summary
        assert set(report["rows"][b]["local_tokens"]) == local
    assert report["selector"].startswith("CLS-free substitute (vlmfix reading)")


def test_llava_next_crops_are_packed_like_the_model():
    tiny = tiny_model("llava_next", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    _, session = single_stream(tiny.model, inputs, quiet(alpha=0.7, beta=0.4, cfg=False), max_new_tokens=1)
    report = session.report()["dual_stream"]
    att = clip_attentions("llava_next", inputs)
    crops = inputs["pixel_values"].shape[1]
    model = tiny.model.model
    for b in range(2):
        # reference: per crop, the local set; packed position of crop patch (c, j) found by packing indices
        index = torch.arange(1, crops * 16 + 1, dtype=torch.float32).view(crops, 16, 1)
        packed, _ = model.pack_image_features(
            [index], inputs["image_sizes"][b : b + 1], "default", image_newline=torch.zeros(1)
        )
        source = packed[0][:, 0].long() - 1  # -1: newline token
        expected_local, expected_summary = set(), set()
        for c in range(crops):
            cls = att[0][b * crops + c, :, 0, 1:].sum(0)
            summary = tukey_reference(cls)
            local = top_reference(cls, 4) - summary
            for position, src in enumerate(source.tolist()):
                if src >= 0 and src // 16 == c:
                    if src % 16 in local:
                        expected_local.add(position)
                    if src % 16 in summary:
                        expected_summary.add(position)
        row = report["rows"][b]
        assert set(row["local_tokens"]) == expected_local
        assert set(row["summary_tokens"]) == expected_summary
        newlines = set((source < 0).nonzero().flatten().tolist())
        assert newlines and not newlines & (expected_local | expected_summary)


# ---------------------------------------------------------------------------------------------
# the boost on tiny models


def selection_masks(session, inputs) -> tuple[Tensor, Tensor]:
    image = session.spans.image
    local, summary = torch.zeros_like(image), torch.zeros_like(image)
    for b, row in enumerate(session.report()["dual_stream"]["rows"]):
        pos = image[b].nonzero().flatten()
        local[b, pos[row["local_tokens"]]] = True
        summary[b, pos[row["summary_tokens"]]] = True
    return local, summary


def boost_row_edit(
    alpha: float, beta: float, local: Tensor, summary: Tensor, image: Tensor, modulation: str | None = None
):
    """The spec's Step 4 (and Step 5's vlmfix readings) on one row of scores z: [heads, kv_len]."""

    def edit(layer_idx, b, z, allowed):
        kv = z.shape[-1]
        gain = alpha * keys_of(local[b], kv).float() + beta * keys_of(summary[b], kv).float()  # [kv]
        factor = torch.ones(z.shape[0])
        if modulation is not None:
            share = plain_softmax(z, allowed)[:, keys_of(image[b], kv)].sum(-1)  # [heads]
            if modulation == "ratio":
                factor = (share / share.mean()).clamp(0, 2)
            else:
                factor = torch.zeros(z.shape[0])
                factor[share.argsort(descending=True)[: z.shape[0] // 2]] = 1.0
        return plain_softmax(z + factor[:, None] * gain[None] * z.abs(), allowed)

    return edit


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("modulation", [None, "ratio", "top_half"])
def test_boost_matches_reference(family, modulation):
    tiny = tiny_model(family, **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    alpha, beta = 3.0, 6.0  # large margins: effects far above the comparison tolerance
    method = quiet(alpha=alpha, beta=beta, head_modulation=modulation, local_ratio=0.5, cfg=False)
    out, session = single_stream(
        tiny.model,
        inputs,
        method,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    local, summary = selection_masks(session, inputs)
    assert local.any()
    tokens, logits = out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits)
    ref_tokens, ref_logits = reference_greedy(
        tiny.model,
        inputs,
        {2, 3, 4},
        boost_row_edit(alpha, beta, local, summary, session.spans.image, modulation),
        steps=4,
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    plain = tiny.model(**inputs).logits[:, -1]
    assert (logits[0] - plain).abs().max() > 5e-4  # 50x the tolerance: the edit is really applied
    assert_unchanged(inputs, before)


def test_margins_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out, _ = single_stream(
        tiny.model, inputs, DualStream(alpha=0.0, beta=0.0, cfg=False), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(ref, out)
    # with the image-free stream at gamma 1 the scores are log p_img: greedy tokens are unchanged too
    out = vlmfix.generate(
        tiny.model,
        **inputs,
        methods=[DualStream(alpha=0.0, beta=0.0, gamma=1.0)],
        tokenizer=tiny.processor,
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(ref, out)
    assert_unchanged(inputs, before)


def test_batch_rows_equal_rows_alone(family):
    """Through the contrastive engine (cfg=True): left padding, images re-encoded from the caller's inputs."""
    tiny = tiny_model(family)
    method = quiet(alpha=2.0, beta=1.0, gamma=1.3)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    assert_batch_rows_equal_rows_alone(tiny, batch, [method], tokenizer=tiny.processor)


def test_refinement_matches_two_separate_streams():
    """gamma * (log p_img - log p_noimg) + log p_noimg with the 0.1 cutoff, from two single-stream forwards:
    the boosted image stream (reference) and the plain prompt without its image tokens."""
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    alpha, beta, gamma = 3.0, 6.0, 1.5
    method = quiet(alpha=alpha, beta=beta, local_ratio=0.5, gamma=gamma)
    with vlmfix.apply(tiny.model, quiet(alpha=alpha, beta=beta, local_ratio=0.5, cfg=False)) as probe:
        probe.generate(**inputs, max_new_tokens=1)
    local, summary = selection_masks(probe, inputs)
    out = vlmfix.generate(
        tiny.model,
        **inputs,
        methods=[method],
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_len:]
    edit = boost_row_edit(alpha, beta, local, summary, probe.spans.image)
    for step in range(3):
        current = grown(inputs, tokens[:, :step])
        positive = reference_logits(tiny.model, current, {2, 3, 4}, edit, prompt_len - 1)[:, -1]
        want = refined_reference(positive, image_free_logits(tiny.model, current), gamma)
        got = out.logits[step]
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(want)], want[~torch.isinf(want)], atol=1e-4, rtol=1e-4)
        assert torch.equal(want.argmax(-1), tokens[:, step])


def test_selector_callable_and_report():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    image = inputs["input_ids"] == tiny.model.config.image_token_id

    def selector(model, model_inputs):
        local, summary = torch.zeros_like(image), torch.zeros_like(image)
        for b in range(2):
            pos = image[b].nonzero().flatten()
            local[b, pos[:3]] = True
            summary[b, pos[2:4]] = True  # position 2 in both: summary wins
        return local, summary

    method = DualStream(alpha=0.5, beta=0.3, selector=selector, cfg=False)
    with vlmfix.apply(tiny.model, method) as session:
        tiny.model.generate(**inputs, max_new_tokens=2)
        kinds = {layer: [type(e).__name__ for e in session.edits_for(layer)] for layer in range(4)}
    report = session.report()["dual_stream"]
    assert [r["local_tokens"] for r in report["rows"]] == [[0, 1], [0, 1]]
    assert [r["summary_tokens"] for r in report["rows"]] == [[2, 3], [2, 3]]
    assert report["selector"] == "callable" and report["layers"] == [2, 3]
    assert kinds == {0: [], 1: [], 2: ["KeyBias"], 3: ["KeyBias"]}
    gain = session.edits_for(2)[0].abs_gain[:, 0]
    pos = image[0].nonzero().flatten()
    assert gain[0, pos[:4]].tolist() == pytest.approx([0.5, 0.5, 0.3, 0.3]) and gain[0, pos[4:]].eq(0).all()

    def bad(model, model_inputs):
        return ~image, image

    with pytest.raises(ValueError, match="selector's local mask marks tokens that are not image tokens"):
        with vlmfix.apply(tiny.model, DualStream(selector=bad, alpha=0.5, cfg=False)):
            tiny.model.generate(**inputs, max_new_tokens=1)


def test_composes_with_gift_and_planned_edits():
    tiny = tiny_model("llava", **SHAPE)
    inputs = tiny.inputs(QUESTIONS)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((2, 4), 0.5))], layers=[0, 3])
    kinds: dict[int, list[str]] = {}
    rows: list = []

    def record(session, layer):  # the other methods' edits of this layer, as the attention function gets them
        rows.append(session.edited_rows)
        kinds[layer] = [
            type(e).__name__
            for m, state in zip(session.methods, session.states)
            if m is not spy
            for e in m.edits(state, layer)
        ]
        return []

    spy = PlannedEdits(record, layers=[0, 1, 2, 3, 4])
    methods = [
        GIFT(saliency_layers=[1], fusion_layers=[2, 3], content_words="rule"),
        quiet(alpha=0.7, beta=0.4),
        scale,
        spy,
    ]
    out = vlmfix.generate(tiny.model, **inputs, methods=methods, tokenizer=tiny.processor, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert kinds == {
        0: ["HeadScale"],
        1: [],
        2: ["FusionReweight", "KeyBias"],
        3: ["FusionReweight", "KeyBias", "HeadScale"],
        4: ["KeyBias"],
    }
    assert rows[-1] == 2  # the engine edits the image stream's rows only


def test_two_refinements_in_one_call_are_refused():
    from vlmfix.methods.pai import PAI

    tiny = tiny_model("llava")
    with pytest.raises(ValueError, match="exactly one contrastive method per call"):
        vlmfix.generate(
            tiny.model, **tiny.inputs(["what"]), methods=[PAI(), DualStream(alpha=0.5)], max_new_tokens=1
        )


def test_pre_encoded_images_without_record_fail_clearly():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    # vlmfix.generate records the caller's image inputs, so the single-stream method runs
    out = vlmfix.generate(tiny.model, **inputs, methods=[DualStream(alpha=0.5, cfg=False)], max_new_tokens=1)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1
    # around a bare model.generate nothing records them: a clear error, not a silent no-op
    with pytest.raises(vlmfix.VlmfixError, match="images were encoded before vlmfix saw the prompt"):
        with vlmfix.apply(tiny.model, DualStream(alpha=0.5, cfg=False)):
            tiny.model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(vlmfix.SessionError, match="DualStream is a two-stream method: call session.generate"):
        with vlmfix.apply(tiny.model, DualStream(alpha=0.5)):
            tiny.model.generate(**tiny.inputs(["what"]), max_new_tokens=1)


def test_strong_alpha_warns():
    with pytest.warns(UserWarning, match=r"alpha=0.7 > 0.5: .* report caption length and repetition"):
        DualStream()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=-0.5), r"`alpha` must be a finite number >= 0, got -0.5"),
        (dict(beta=float("inf")), r"`beta` must be a finite number >= 0, got inf"),
        (dict(local_ratio=1.5), r"`local_ratio` must be a finite number in \[0, 1\], got 1.5"),
        (dict(spatial_ratio=-0.1), r"`spatial_ratio` must be a finite number in \[0, 1\], got -0.1"),
        (dict(summary_rule="iqr"), r"`summary_rule` must be one of 'tukey', 'topk_ratio', got 'iqr'"),
        (dict(head_modulation="all"), r"`head_modulation` must be one of None, 'ratio', 'top_half', got 'all'"),
        (dict(local_layer=-1), r"`local_layer` must be an int >= 0, got -1"),
        (dict(selector="cls"), r"`selector` must be a callable"),
        (dict(gamma=0.9), r"`gamma` must be a finite number >= 1, got 0.9"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DualStream(**{"alpha": 0.5, **kwargs})


def test_vision_layer_beyond_depth():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(["what"])
    with pytest.raises(ValueError, match=r"`summary_layer`=5, but the vision tower has 2 layers"):
        single_stream(tiny.model, inputs, DualStream(alpha=0.5, summary_layer=5, cfg=False), max_new_tokens=1)
