"""The contrastive engine: two streams in one batched forward, one token for both, separate caches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.contrastive import (
    ContrastiveMethod,
    StreamPairCache,
    require_engine,
    split_streams,
)
from vlmfix.decoding.edits import KeyBias
from vlmfix.methods.contrast import contrast_logits

from .conftest import PlannedEdits, tiny_model


class TakeStream(ContrastiveMethod):
    """Test method: the negative stream sees another image (or none); scores are one stream or the contrast."""

    name = "take-stream-test"
    needs_image = True

    def __init__(self, other_pixels: Tensor | None = None, take: str = "contrast", alpha: float = 1.0,
                 beta: float | None = None) -> None:
        self.other_pixels, self.take, self.alpha, self.beta = other_pixels, take, alpha, beta

    def prepare(self, session: Any) -> Any:
        require_engine(session, self)
        return session

    def negative_inputs(self, session: Any, state: Any) -> dict:
        if self.other_pixels is None:  # PAI-like: the same prompts without their images
            return session.adapter.without_image(session.inputs, pad_token_id=session.tokenizer.pad_token_id)
        assert "pixel_values" in session.image_inputs
        return {**session.inputs, "pixel_values": self.other_pixels}

    def combine(self, state: Any, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        if self.take == "positive":
            return positive_logits
        if self.take == "negative":
            return negative_logits
        return contrast_logits(positive_logits, negative_logits, self.alpha, self.beta)


QUESTIONS = ["describe this image .", "is there a dog on the table ?"]


def batch(family: str, seed: int = 0, questions: list[str] = QUESTIONS) -> dict:
    return tiny_model(family).inputs(questions, seed=seed)


def other_pixels(family: str) -> Tensor:
    return batch(family, seed=3)["pixel_values"]  # same image sizes (the size cycles every 3), other content


def snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items()}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for key, value in before.items():
        assert torch.equal(inputs[key], value), f"{key} was modified in place"


def positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------- rules
def test_contrast_golden_values():
    positive = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    negative = torch.tensor([[1.0, 2.0, 0.0, -3.0]])
    # (1 + 0.5) * l - 0.5 * l'
    assert torch.equal(contrast_logits(positive, negative, 0.5, None), torch.tensor([[2.5, 0.5, -1.5, 1.5]]))
    # beta 0.3: keep l_j >= 2 + log 0.3 = 0.796 -> tokens 0 and 1
    inf = float("-inf")
    assert torch.equal(contrast_logits(positive, negative, 0.5, 0.3), torch.tensor([[2.5, 0.5, inf, inf]]))
    assert torch.equal(positive, torch.tensor([[2.0, 1.0, -1.0, 0.0]]))  # inputs untouched


def test_split_streams_checks_layout():
    logits = torch.arange(12.0).view(6, 2)
    pos, neg = split_streams(logits, 3)
    assert torch.equal(pos, logits[:3]) and torch.equal(neg, logits[3:])
    with pytest.raises(ValueError, match=r"2\*B = 4 rows for B = 2 prompts .*rows 0..1 positive.*rows 2..3 negative"):
        split_streams(logits, 2)


def test_pair_cache_reorders_both_halves():
    cache = StreamPairCache()
    keys = torch.arange(4.0).view(4, 1, 1, 1)  # rows: pos0, pos1, neg0, neg1
    cache.update(keys, keys.clone(), 0)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.layers[0].keys.flatten().tolist() == [1.0, 1.0, 3.0, 3.0]


# ------------------------------------------------------------------------------------------- engine
def test_alpha_zero_is_plain_generate(family):
    tiny = tiny_model(family)
    inputs = batch(family)
    before = snapshot(inputs)
    plain = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(other_pixels(family), alpha=0.0)],
                          tokenizer=tiny.processor, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, plain)
    assert_unchanged(inputs, before)


def test_beams_reorder_both_streams():
    family = "qwen2_vl"  # its tiny model's beams depend on the image (the tiny LLaVA's barely do)
    tiny = tiny_model(family)
    inputs = batch(family)
    # alpha 0 follows the positive stream, take="negative" the negative one: both must match plain beam search
    plain = tiny.model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(other_pixels(family), alpha=0.0)],
                          max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(out, plain)
    negative_inputs = {**inputs, "pixel_values": other_pixels(family)}
    plain_negative = tiny.model.generate(**negative_inputs, max_new_tokens=6, num_beams=3, do_sample=False)
    assert not torch.equal(plain_negative, plain)
    out = vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(other_pixels(family), take="negative")],
                          max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(out, plain_negative)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_image_free_negative_stream(family):
    """A PAI-like negative stream (shorter prompts, re-padded) decodes exactly like its own generate."""
    tiny = tiny_model(family)
    inputs = batch(family)
    adapter = vlmfix.get_adapter(tiny.model)
    negative = adapter.without_image(dict(inputs), pad_token_id=tiny.tokenizer.pad_token_id)
    negative.pop("position_ids")
    plain_negative = tiny.model.generate(**negative, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(take="negative")], tokenizer=tiny.processor,
                          max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], plain_negative[:, negative["input_ids"].shape[1]:])


def reference_scores(model: Any, inputs: dict, negative_pixels: Tensor, tokens: Tensor, alpha: float,
                     beta: float | None) -> list[Tensor]:
    """Two separate single-stream forwards per step (no cache), combined by the formula."""
    scores = []
    for step in range(tokens.shape[1]):
        ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :step])], dim=1)
        streams = []
        for pixels in (inputs["pixel_values"], negative_pixels):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                               pixel_values=pixels).logits[:, -1].float()
            streams.append(logits)
        positive, negative = streams
        score = (1 + alpha) * positive - alpha * negative
        if beta is not None:
            score[positive < positive.max(-1, keepdim=True).values + torch.log(torch.tensor(beta))] = float("-inf")
        scores.append(score)
    return scores


def test_engine_scores_equal_two_single_stream_runs():
    tiny = tiny_model("llava")
    inputs = batch("llava")  # two rows of different lengths: left padding
    assert not bool(inputs["attention_mask"].all())
    method = TakeStream(other_pixels("llava"), alpha=1.5, beta=0.2)
    out = vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    expected = reference_scores(tiny.model, inputs, other_pixels("llava"), tokens, 1.5, 0.2)
    for got, want in zip(out.logits, expected):
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)
    # greedy picked the best combined score at every step
    assert torch.equal(torch.stack([s.argmax(-1) for s in expected], dim=1), tokens)
    # greedy applies the contrast: the scores differ from the positive stream's own logits
    plain = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
    assert not torch.allclose(out.logits[0], plain.logits[0])


def test_streams_share_tokens_and_keep_separate_caches():
    tiny = tiny_model("llava")
    inputs = batch("llava")
    seen: list[Tensor] = []
    embed = tiny.model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        torch.manual_seed(7)
        out = vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(other_pixels("llava"))], do_sample=True,
                              top_k=0, max_new_tokens=5, return_dict_in_generate=True)
    finally:
        handle.remove()
    rows = inputs["input_ids"].shape[0]
    decode_steps = [ids for ids in seen if ids.shape[1] == 1]
    assert len(decode_steps) == 4 and all(ids.shape[0] == 2 * rows for ids in decode_steps)
    for ids in decode_steps:  # one batched forward per step, the same token in both halves
        assert torch.equal(ids[:rows], ids[rows:])
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(torch.cat(decode_steps, dim=1)[:rows], generated[:, :4])

    # the negative rows hold the negative stream's own keys (not the positive stream's)
    cache = out.past_key_values
    assert isinstance(cache, StreamPairCache)
    keys = cache.layers[1].keys  # [2B, kv_heads, kv_len, head_dim]
    assert not torch.allclose(keys[:rows], keys[rows:])
    ids = torch.cat([inputs["input_ids"], generated[:, :4]], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, :4])], dim=1)
    with torch.no_grad():
        alone = tiny.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                           pixel_values=other_pixels("llava"), use_cache=True).cache
    valid = mask.bool()
    torch.testing.assert_close(keys[rows:].transpose(1, 2)[valid], alone.layers[1].keys.transpose(1, 2)[valid],
                               atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible():
    tiny = tiny_model("qwen2_vl")
    inputs = batch("qwen2_vl")
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(other_pixels("qwen2_vl"))],
                                    do_sample=True, max_new_tokens=4, num_return_sequences=2))
    assert runs[0].shape[0] == 4 and torch.equal(runs[0], runs[1])


def test_attention_edits_touch_the_positive_rows_only():
    family = "qwen2_vl"
    tiny = tiny_model(family)
    inputs = batch(family)
    rows_seen: list[int | None] = []

    def bias(session: Any, layer: int) -> list:
        rows_seen.append(session.edited_rows)
        image = session.spans.image[:, None].float()  # [B, 1, prompt_len]
        return [KeyBias(bias=4.0 * image)]

    edit = PlannedEdits(bias, layers=[1, 2])
    plain = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    edited = vlmfix.generate(tiny.model, **inputs, methods=[edit], max_new_tokens=6, do_sample=False)
    assert not torch.equal(edited, plain)
    # the positive stream is decoded with the edit, exactly as a plain edited run
    out = vlmfix.generate(tiny.model, **inputs, methods=[edit, TakeStream(other_pixels(family), take="positive")],
                          max_new_tokens=6, do_sample=False)
    assert torch.equal(out, edited)
    assert rows_seen[-1] == inputs["input_ids"].shape[0]
    # the negative stream is not edited
    plain_negative = tiny.model.generate(**{**inputs, "pixel_values": other_pixels(family)}, max_new_tokens=6,
                                         do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[edit, TakeStream(other_pixels(family), take="negative")],
                          max_new_tokens=6, do_sample=False)
    assert torch.equal(out, plain_negative)


def test_errors_are_clear():
    tiny = tiny_model("llava")
    inputs = batch("llava")
    pixels = other_pixels("llava")
    with pytest.raises(ValueError, match="exactly one contrastive method per call"):
        vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(pixels), TakeStream(pixels)], max_new_tokens=2)
    with pytest.raises(ValueError, match="use_cache=False cannot be used"):
        vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(pixels)], max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="assistant_model cannot be used"):
        vlmfix.generate(tiny.model, **inputs, methods=[TakeStream(pixels)], max_new_tokens=2,
                        assistant_model=tiny.model)
    with pytest.raises(vlmfix.SessionError, match=r"two-stream method: call session.generate"):
        with vlmfix.apply(tiny.model, TakeStream(pixels)):
            tiny.model.generate(**inputs, max_new_tokens=2)
    # the model is left as it was: no hooks remain
    assert not tiny.model._forward_hooks and not tiny.model._forward_pre_hooks
