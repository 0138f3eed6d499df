"""SID: the negative stream keeps only the least-attended image keys from layer K on, re-selected at every step.

The references are written here in plain PyTorch on the model's eager attention: the kept set of each step
comes from `output_attentions` of layer K-1 (the newest row, head mean, the smallest scores, ties to the lower
position), and the negative stream is a no-cache forward whose layers >= K get a 4-D mask hiding, for every
query row, the image keys the set of that row's step dropped (prompt rows: the prefill's set; the token fed
at step s: the set of step s), which is what an incremental decode with a cache computes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix import SID, VAR
from vlmfix.decoding.edits import KeyBias
from vlmfix.methods.image_selection import NewestRowAttention, all_rows

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


# ---------------------------------------------------------------------------------------------- references
def reference_kept(scores: Tensor, image: Tensor, keep: list[int]) -> Tensor:
    """[B, S] bool: per row, the keep[b] image positions with the smallest score, ties to the lower position."""
    kept = torch.zeros_like(image)
    for b in range(image.shape[0]):
        positions = image[b].nonzero().flatten().tolist()
        ranked = sorted(positions, key=lambda j: (float(scores[b, j]), j))
        kept[b, ranked[: keep[b]]] = True
    return kept


def masked_forward(tiny: Any, inputs: dict, hidden: Tensor, first_layer: int) -> Tensor:
    """Last-row logits [B, vocab] of a no-cache eager forward whose layers >= first_layer cannot see
    hidden[b, i, j] (query row i, key j)."""
    adapter = vlmfix.get_adapter(tiny.model)

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"]  # [B, 1, T, T] additive (eager)
        kwargs["attention_mask"] = mask.masked_fill(hidden[:, None], torch.finfo(mask.dtype).min)
        return args, kwargs

    handles = [adapter.attn(layer).register_forward_pre_hook(hide, with_kwargs=True)
               for layer in range(first_layer, adapter.num_layers)]
    try:
        with torch.no_grad():
            return tiny.model(**inputs, use_cache=False).logits[:, -1].float()
    finally:
        for handle in handles:
            handle.remove()


def reference_sid(tiny: Any, inputs: dict, tokens: Tensor, keep: list[int], layer: int,
                  every_step: bool = True) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per step t (0 = prefill): the positive logits, the negative logits and the kept set, following `tokens`."""
    model = tiny.model
    model.set_attn_implementation("eager")
    prompt = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == model.config.image_token_id  # [B, P]
    positives, negatives, sets = [], [], []
    try:
        for step in range(tokens.shape[1]):
            step_inputs = extended(tiny, inputs, tokens[:, :step])
            with torch.no_grad():
                plain = model(**step_inputs, use_cache=False, output_attentions=True)
            scores = plain.attentions[layer - 1][:, :, -1].float().mean(dim=1)  # [B, kv]: head mean, newest row
            sets.append(reference_kept(scores, image, keep) if every_step or not sets else sets[0])
            length = prompt + step
            hidden = torch.zeros(image.shape[0], length, length, dtype=torch.bool)
            for row in range(length):
                owner = sets[max(0, row - prompt + 1)]  # the set of the step that fed this row
                hidden[:, row, :prompt] = image & ~owner
            positives.append(plain.logits[:, -1].float())
            negatives.append(masked_forward(tiny, step_inputs, hidden, layer))
    finally:
        model.set_attn_implementation("sdpa")
    return positives, negatives, sets


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_strength_zero_and_keeping_every_token_are_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    plain = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for method in (SID(alpha=0.0, apc_beta=None), SID(keep_ratio=1.0)):  # l' = l when nothing is hidden
        out = vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=5, do_sample=False)
        assert torch.equal(out, plain)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_streams_selection_and_scores_match_the_eager_reference(family):
    tiny = tiny_model(family, seed=1)
    inputs = tiny.inputs(QUESTIONS)  # two rows of different lengths: left padding
    assert not bool(inputs["attention_mask"].all())
    before = snapshot(inputs)
    method = SID(alpha=1.0, apc_beta=0.1, keep_ratio=0.25)
    out, streams, report = run_two_streams(tiny, inputs, [method])
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    keep = [round(0.25 * int(n)) for n in image.sum(1)]
    positives, negatives, sets = reference_sid(tiny, inputs, tokens, keep, layer=2)
    rows = image.shape[0]
    assert len(streams) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(streams[step][:rows], positives[step], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(streams[step][rows:], negatives[step], atol=1e-4, rtol=1e-4)
        assert_scores_close(out.logits[step], formula(positives[step], negatives[step], 1.0, 0.1))
        assert not torch.allclose(positives[step], negatives[step], atol=1e-3)  # the hidden keys matter
    sid = report["sid"]
    for b in range(rows):
        assert sid["rows"][b]["keep"] == keep[b]
        assert sid["rows"][b]["kept_prefill"] == image_order_indices(sets[0], image, b)
        assert sid["rows"][b]["kept_last"] == image_order_indices(sets[-1], image, b)
    assert sid["selections"] == STEPS
    assert sum(row["selection_changes"] for row in sid["rows"]) > 0  # text-aware: the set moved with the text
    assert sid["applied"]["contrast_steps"] == STEPS and sid["applied"]["attention_calls"] == STEPS * 2
    assert_unchanged(inputs, before)


def test_both_streams_see_the_same_selection_row():
    """Below K the streams compute the same attention, so the negative rows' layer K-1 row (what SID reads)
    equals the positive rows' at every step."""
    tiny = tiny_model("llava", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    rows: list[Tensor] = []
    observer = NewestRowAttention(frozenset({1}), all_rows, on_scores=lambda _, scores: rows.append(scores))
    with vlmfix.apply(tiny.model, SID(keep_ratio=0.25)) as session, session.observing(observer):
        session.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(rows) == 3 and all(r.shape[0] == 4 for r in rows)
    for scores in rows:
        torch.testing.assert_close(scores[:2], scores[2:], atol=1e-6, rtol=0)


def test_prefill_only_keeps_the_prefill_set():
    tiny = tiny_model("llava", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    out, streams, report = run_two_streams(tiny, inputs, [SID(keep=3, reselect="prefill_only")])
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    _, negatives, sets = reference_sid(tiny, inputs, tokens, [3, 3], layer=2, every_step=False)
    for step in range(STEPS):
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)
    rows = report["sid"]["rows"]
    assert report["sid"]["selections"] == 1
    assert all(row["kept_last"] == row["kept_prefill"] and row["selection_changes"] == 0 for row in rows)


def test_a_later_selection_layer():
    tiny = tiny_model("llava", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    out, streams, _ = run_two_streams(tiny, inputs, [SID(keep=5, layer=3)], steps=2)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    _, negatives, _ = reference_sid(tiny, inputs, tokens, [5, 5], layer=3)
    for step in range(2):
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)


def test_greedy_without_the_cutoff_takes_the_raw_contrast():
    tiny = tiny_model("qwen2_vl", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    out, streams, report = run_two_streams(tiny, inputs, [SID(alpha=3.0, apc_in_greedy=False, keep_ratio=0.2)])
    assert report["sid"]["apc_beta"] is None
    for step, got in enumerate(out.logits):
        positive, negative = streams[step][:2], streams[step][2:]
        assert not torch.isinf(got).any()
        torch.testing.assert_close(got, 4.0 * positive - 3.0 * negative, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1] + step], got.argmax(-1))
    # sampling keeps the cutoff whatever apc_in_greedy says
    with vlmfix.apply(tiny.model, SID(apc_in_greedy=False)) as session:
        torch.manual_seed(0)
        session.generate(**inputs, max_new_tokens=2, do_sample=True)
        assert session.report()["sid"]["apc_beta"] == 0.1


def test_padded_rows_equal_rows_decoded_alone():
    tiny = tiny_model("qwen2_vl", seed=1)  # the rows' images give 9 and 16 image tokens
    batch = tiny.inputs(QUESTIONS)
    assert_batch_rows_equal_rows_alone(tiny, batch, [SID(keep_ratio=0.3)], steps=3)


def test_composes_with_an_attention_method():
    """VAR edits the positive rows only; the negative stream stays SID's own, and selection reads the negative
    rows, so an edit of the positive stream below K leaves it exact too."""
    tiny = tiny_model("llava", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    var = VAR(sink_dims=[0, 5, 9, 13], tau=2.0)
    below_k = PlannedEdits(lambda session, layer: [KeyBias(bias=3.0 * session.spans.image[:, None].float())],
                           layers=[0, 1])
    out, streams, report = run_two_streams(tiny, inputs, [var, below_k, SID(keep_ratio=0.25)])
    assert report["var"]["applied"]["attention_calls"] > 0 and report["planned-edits-test"]["applied"][
        "attention_calls"] > 0
    assert report["sid"]["applied"]["attention_calls"] > 0
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    _, negatives, _ = reference_sid(tiny, inputs, tokens, [round(0.25 * int(n)) for n in image.sum(1)], layer=2)
    for step in range(STEPS):
        torch.testing.assert_close(streams[step][2:], negatives[step], atol=1e-4, rtol=1e-4)
    # the positive stream's prefill is the attention methods' own
    with vlmfix.apply(tiny.model, var, below_k) as session:
        alone = session.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    torch.testing.assert_close(streams[0][:2], alone.logits[0].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: SID(layer=0), r"`layer` must be an int >= 1, got 0; .*selection reads layer K-1"),
    (lambda: SID(layer=1.0), r"`layer` must be an int >= 1, got 1.0 \(a float\)"),
    (lambda: SID(keep_ratio=1.5), r"`keep_ratio` must be a finite number in \[0, 1\], got 1.5"),
    (lambda: SID(keep=-1), r"`keep` must be None or an int >= 0, got -1"),
    (lambda: SID(alpha=-1), r"`alpha` must be a finite number >= 0, got -1"),
    (lambda: SID(apc_beta=0), r"`apc_beta` must be None or a finite number in \(0, 1\], got 0"),
    (lambda: SID(apc_in_greedy="no"), r"`apc_in_greedy` must be True or False, got 'no'"),
    (lambda: SID(reselect="never"), r"`reselect` must be one of 'every_step', 'prefill_only', got 'never'"),
])
def test_constructor_refuses_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_calls_are_refused_before_any_forward():
    tiny = tiny_model("llava")
    calls: list[int] = []
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(lambda *args: calls.append(1))
    inputs = tiny.inputs(QUESTIONS)
    try:
        with pytest.raises(ValueError, match=r"`layer` holds \[4\], but the language model has 4 layers"):
            vlmfix.apply(tiny.model, SID(layer=4))
        with pytest.raises(vlmfix.SessionError, match="SID is a two-stream method: call session.generate"):
            with vlmfix.apply(tiny.model, SID()):
                tiny.model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(vlmfix.MissingImageError, match=r"sid need an image in every prompt.*rows \[1\]"):
            vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS, with_image=[True, False]), methods=[SID()],
                            max_new_tokens=2)
        no_context = {**inputs, "input_ids": inputs["input_ids"].clone()}
        image = no_context["input_ids"] == tiny.model.config.image_token_id
        no_context["attention_mask"] = inputs["attention_mask"].clone()
        first = int(image[0].nonzero()[0])
        no_context["attention_mask"][0, :first] = 0  # row 0 starts at its image
        with pytest.raises(ValueError, match=r"in rows \[0\] no text token precedes the image"):
            vlmfix.generate(tiny.model, **no_context, methods=[SID()], max_new_tokens=2)
    finally:
        handle.remove()
    assert not calls
    assert vlmfix.methods.get("sid") is SID


def test_the_grouped_decode_path_serves_the_hidden_keys():
    """kernel="always" routes the decode steps' -inf key bias through the grouped kernel path (its Triton
    interpreter or reference on the CPU); it matches the PyTorch path."""
    tiny = tiny_model("llava", seed=1)
    inputs = tiny.inputs(QUESTIONS)
    scores = {}
    for kernel in ("never", "always"):
        with vlmfix.apply(tiny.model, SID(keep_ratio=0.25), kernel=kernel) as session:
            out = session.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
        scores[kernel] = torch.stack(out.logits)
    finite = torch.isfinite(scores["never"])
    assert torch.equal(finite, torch.isfinite(scores["always"]))
    torch.testing.assert_close(scores["always"][finite], scores["never"][finite], atol=1e-5, rtol=1e-5)
