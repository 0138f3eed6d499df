"""AvisC: the negative stream zeroes the input embeddings of every image token but the "blind" ones.

The references are written here in plain PyTorch: the blind tokens come from an eager forward's
`output_attentions` (every layer's newest prompt row, head mean; per row the fewest layers reaching
`layer_gamma` of the image mass; the tokens at or above mean + lamb * std of their mean attention), and the
negative stream is a plain no-cache forward of the language model on the model's own `inputs_embeds` with the
other image tokens' embeddings set to zero.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix import VAR, AvisC
from vlmfix.decoding.edits import KeyBias

from .conftest import PlannedEdits, tiny_model
from .reference_decoding import QUESTIONS, assert_batch_rows_equal_rows_alone, assert_unchanged, snapshot
from .two_stream_reference import (
    assert_scores_close,
    extended,
    formula,
    image_order_indices,
    run_two_streams,
)

STEPS = 4  # the prefill and three decode steps


def reference_blind(tiny: Any, inputs: dict, gamma: float, lamb: float,
                    keep: int | None = None) -> tuple[Tensor, list[list[int]]]:
    """([B, P] bool blind tokens, per row the averaged layers) from an eager forward's attention weights."""
    model = tiny.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**extended(tiny, inputs, inputs["input_ids"][:, :0]), output_attentions=True,
                               use_cache=False).attentions
    finally:
        model.set_attn_implementation("sdpa")
    image = inputs["input_ids"] == model.config.image_token_id
    rows = torch.stack([a[:, :, -1].float().mean(dim=1) for a in attentions], dim=1)  # [B, L, P]
    blind = torch.zeros_like(image)
    chosen_layers = []
    for b in range(image.shape[0]):
        positions = image[b].nonzero().flatten()
        masses = [float(rows[b, layer, positions].sum()) for layer in range(rows.shape[1])]
        shares = [m / sum(masses) for m in masses]
        ranked = sorted(range(len(shares)), key=lambda layer: (-shares[layer], layer))
        cumulative, count = 0.0, 1
        for layer in ranked:
            cumulative += shares[layer]
            if cumulative < gamma:
                count += 1
        layers = sorted(ranked[:count])
        chosen_layers.append(layers)
        scores = rows[b, layers][:, positions].mean(dim=0)  # [image tokens]
        if keep is None:
            selected = positions[scores >= scores.mean() + lamb * scores.std()]
        else:
            order = sorted(range(len(positions)), key=lambda j: (-float(scores[j]), j))[:keep]
            selected = positions[order]
        blind[b, selected] = True
    return blind, chosen_layers


def reference_streams(tiny: Any, inputs: dict, tokens: Tensor, zeroed: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per step: the plain model's logits, and those of the language model run on the plain forward's own
    inputs_embeds with the `zeroed` prompt positions ([B, P] bool) set to 0."""
    adapter = vlmfix.get_adapter(tiny.model)
    prompt = inputs["input_ids"].shape[1]
    positives, negatives = [], []
    for step in range(tokens.shape[1]):
        step_inputs = extended(tiny, inputs, tokens[:, :step])
        seen: dict[str, Any] = {}

        def record(module, args, kwargs, seen=seen):
            seen.update(embeds=kwargs["inputs_embeds"].clone(), positions=kwargs["position_ids"].clone())

        handle = adapter.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                positives.append(tiny.model(**step_inputs, use_cache=False).logits[:, -1].float())
        finally:
            handle.remove()
        embeds = seen["embeds"]  # [B, T, hidden]
        embeds[:, :prompt][zeroed] = 0.0
        with torch.no_grad():
            hidden = adapter.language_model(inputs_embeds=embeds, attention_mask=step_inputs["attention_mask"],
                                            position_ids=seen["positions"], use_cache=False).last_hidden_state
            negatives.append(tiny.model.lm_head(hidden[:, -1]).float())
    return positives, negatives


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_strength_zero_is_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    plain = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[AvisC(alpha=0.0, apc_beta=None)], max_new_tokens=5,
                          do_sample=False)
    assert torch.equal(out, plain)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_selection_streams_and_scores_match_the_reference(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)  # left-padded rows of different lengths
    before = snapshot(inputs)
    out, streams, report = run_two_streams(tiny, inputs, [AvisC(alpha=1.0, apc_beta=0.1)])
    blind, layers = reference_blind(tiny, inputs, gamma=0.5, lamb=1.0)
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    avisc = report["avisc"]
    for b, row in enumerate(avisc["rows"]):
        assert row["layers"] == layers[b]
        assert row["kept"] == image_order_indices(blind, image, b)
        assert row["zeroed"] == image_order_indices(image & ~blind, image, b)
        assert 0 < len(row["kept"]) < row["image_tokens"]
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    positives, negatives = reference_streams(tiny, inputs, tokens, image & ~blind)
    assert len(streams) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(streams[step][:2], positives[step], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)
        assert_scores_close(out.logits[step], formula(positives[step], negatives[step], 1.0, 0.1))
        assert not torch.allclose(positives[step], negatives[step], atol=1e-3)  # the zeroed tokens matter
    assert avisc["embedding_edits"] == 1 and avisc["applied"]["contrast_steps"] == STEPS
    assert_unchanged(inputs, before)


def test_a_fixed_count_keeps_the_most_attended_tokens():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    out, streams, report = run_two_streams(tiny, inputs, [AvisC(keep=4, layer_gamma=0.8, apc_beta=None)], steps=2)
    blind, layers = reference_blind(tiny, inputs, gamma=0.8, lamb=0.0, keep=4)
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    for b, row in enumerate(report["avisc"]["rows"]):
        assert row["layers"] == layers[b] and row["kept"] == image_order_indices(blind, image, b)
        assert len(row["kept"]) == 4
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    _, negatives = reference_streams(tiny, inputs, tokens, image & ~blind)
    for step in range(2):
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.logits[step], 2 * streams[step][:2] - streams[step][2:], atol=1e-5,
                                   rtol=1e-5)


def test_padded_rows_equal_rows_decoded_alone():
    tiny = tiny_model("qwen2_vl")  # the rows' images give 9 and 16 image tokens
    assert_batch_rows_equal_rows_alone(tiny, tiny.inputs(QUESTIONS), [AvisC()], steps=3)


def test_composes_with_an_attention_method():
    """VAR edits the positive rows; the negative stream stays the plain model's with the zeroed embeddings."""
    tiny = tiny_model("llava", seed=1)  # VAR finds sinks on this one
    inputs = tiny.inputs(QUESTIONS)
    var = VAR(sink_dims=[0, 5, 9, 13], tau=2.0)
    out, streams, report = run_two_streams(tiny, inputs, [var, AvisC()])
    assert report["var"]["applied"]["attention_calls"] > 0 and report["avisc"]["embedding_edits"] == 1
    blind, _ = reference_blind(tiny, inputs, gamma=0.5, lamb=1.0)
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    _, negatives = reference_streams(tiny, inputs, tokens, image & ~blind)
    for step in range(STEPS):
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)
    with vlmfix.apply(tiny.model, var) as session:
        alone = session.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    torch.testing.assert_close(streams[0][:2], alone.logits[0].float(), atol=1e-5, rtol=1e-5)


def test_the_probe_reads_the_unedited_model():
    """A strong bias on the positive stream's later image keys would move the blind tokens if the probe saw it."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)

    def later_image(session: Any, layer: int) -> list[KeyBias]:
        image = session.spans.image  # [B, P]
        return [KeyBias(bias=6.0 * (image & (image.cumsum(-1) > 8))[:, None].float())]

    _, _, report = run_two_streams(tiny, inputs, [PlannedEdits(later_image), AvisC()], steps=1)
    assert report["planned-edits-test"]["applied"]["attention_calls"] > 0
    blind, layers = reference_blind(tiny, inputs, gamma=0.5, lamb=1.0)
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    for b, row in enumerate(report["avisc"]["rows"]):
        assert row["layers"] == layers[b] and row["kept"] == image_order_indices(blind, image, b)


def test_sampling_and_beams_run():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(vlmfix.generate(tiny.model, **inputs, methods=["avisc"], do_sample=True, max_new_tokens=3))
    assert torch.equal(runs[0], runs[1])
    beams = vlmfix.generate(tiny.model, **inputs, methods=[AvisC()], num_beams=2, num_return_sequences=2,
                            max_new_tokens=3)
    assert beams.shape[0] == 4


@pytest.mark.parametrize("make, message", [
    (lambda: AvisC(layer_gamma=0), r"`layer_gamma` must be a finite number in \(0, 1\], got 0"),
    (lambda: AvisC(lamb=math.nan), r"`lamb` must be a finite number, got nan"),
    (lambda: AvisC(lamb="1"), r"`lamb` must be a finite number, got '1' \(a str\)"),
    (lambda: AvisC(keep=2.5), r"`keep` must be None or an int >= 0, got 2.5"),
    (lambda: AvisC(alpha=-0.5), r"`alpha` must be a finite number >= 0, got -0.5"),
    (lambda: AvisC(apc_beta=2), r"`apc_beta` must be None or a finite number in \(0, 1\], got 2"),
])
def test_constructor_refuses_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_calls_are_refused_before_any_forward():
    tiny = tiny_model("llava")
    calls: list[int] = []
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(vlmfix.SessionError, match="AvisC is a two-stream method: call session.generate"):
            with vlmfix.apply(tiny.model, AvisC()):
                tiny.model.generate(**tiny.inputs(QUESTIONS), max_new_tokens=2)
        with pytest.raises(vlmfix.MissingImageError, match=r"avisc need an image in every prompt.*rows \[1\]"):
            vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS, with_image=[True, False]), methods=[AvisC()],
                            max_new_tokens=2)
    finally:
        handle.remove()
    assert not calls
    assert vlmfix.methods.get("avisc") is AvisC
