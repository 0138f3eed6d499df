"""With no method (or identity edits), vlmfix gives bit-identical results to plain `model.generate`."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

import vlmfix
from vlmfix.decoding.edits import HeadScale, KeyBias, Transfer
from vlmfix.testing import FAMILIES

from .conftest import PlannedEdits, tiny_model

QUESTIONS = ["Describe this image.", "is there a dog in the picture ?", "what"]

MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.3),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "scores": dict(do_sample=False, return_dict_in_generate=True, output_scores=True),
}


def generate_both(model, inputs, mode: str, run) -> tuple[Any, Any]:
    kwargs = dict(max_new_tokens=6, **MODES[mode])
    torch.manual_seed(7)
    ref = model.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    out = run(model, inputs, kwargs)
    return ref, out


def via_generate(model, inputs, kwargs):
    return vlmfix.generate(model, **inputs, **kwargs)


def via_apply(model, inputs, kwargs):
    with vlmfix.apply(model):
        return model.generate(**inputs, **kwargs)


def assert_same(ref, out) -> None:
    if isinstance(ref, torch.Tensor):
        assert torch.equal(ref, out)
        return
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("runner", [via_generate, via_apply], ids=["generate", "apply"])
def test_no_method_is_bit_identical(family, attn, mode, runner):
    tiny = tiny_model(family, attn)
    inputs = tiny.inputs(QUESTIONS)  # batch of 3, left padding, different prompt lengths
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    ref, out = generate_both(tiny.model, inputs, mode, runner)
    assert_same(ref, out)


def identity_edits(session, layer_idx):
    spans = session.spans
    zeros = torch.zeros(spans.batch_size, 1, spans.seq_len)
    heads = vlmfix.get_adapter(session.model).num_heads
    return [
        KeyBias(bias=zeros, abs_gain=zeros),
        Transfer(source=spans.image, receivers=spans.instruction, fraction=0.0),
        HeadScale(scale=torch.ones(spans.batch_size, heads)),
    ]


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_identity_edits_keep_tokens(family, mode):
    """Bias 0, fraction 0 and scale 1 on every layer take the PyTorch edit path and keep every token."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    calls = []

    def counting(session, layer_idx):
        calls.append(layer_idx)
        return identity_edits(session, layer_idx)

    ref, out = generate_both(
        tiny.model, inputs, mode, lambda m, i, kw: vlmfix.generate(m, **i, methods=[PlannedEdits(counting)], **kw)
    )
    assert torch.equal(ref, out)
    assert len(calls) >= 6 * tiny.model.config.text_config.num_hidden_layers  # prefill + decode steps


def test_edit_changes_tokens():
    """A strong edit must reach the model through the hook (guards against a silent no-op)."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    ref = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                              output_scores=True)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((s.spans.batch_size, 4), 5.0))])
    out = vlmfix.generate(tiny.model, **inputs, methods=[scale], max_new_tokens=6, do_sample=False,
                          return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(ref.scores[0], out.scores[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_equal_rows_alone_with_edits(family):
    """Per-row edits in a left-padded batch give each row the tokens it gets alone."""
    tiny = tiny_model(family)

    def image_bias(session, layer_idx):
        return [KeyBias(abs_gain=session.spans.image[:, None].float() * 0.5, rows="last")]

    method = PlannedEdits(image_bias, layers=[1, 2])
    batch = tiny.inputs(QUESTIONS[:2])
    together = vlmfix.generate(tiny.model, **batch, methods=[method], max_new_tokens=5, do_sample=False)
    for i, question in enumerate(QUESTIONS[:2]):
        alone_inputs = tiny.inputs([question], seed=i)
        alone = vlmfix.generate(tiny.model, **alone_inputs, methods=[method], max_new_tokens=5, do_sample=False)
        assert generated(together, batch, i, tiny) == generated(alone, alone_inputs, 0, tiny)


def generated(sequences, inputs, row, tiny) -> list[int]:
    """The new tokens of `row`, up to and including the first end-of-sequence token."""
    tokens = sequences[row, inputs["input_ids"].shape[1] :].tolist()
    eos = tiny.model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# every cache implementation generate accepts: vlmfix does what plain generate does (the same tokens and
# scores where it works, the same refusal where it does not, e.g. an offloaded cache on a CPU-only torch)
CACHE_IMPLEMENTATIONS = ALL_CACHE_IMPLEMENTATIONS


def outcome(run) -> tuple[str, Any]:
    try:
        return "ok", run()
    except Exception as error:  # the same failure is parity too
        return "error", type(error)


@pytest.mark.parametrize("implementation", CACHE_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_cache_implementation_matches_plain_generate(family, implementation):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)  # left padding: a static cache gets a 4-D mask at the prefill
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  cache_implementation=implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated implementations warn
        ref = outcome(lambda: tiny.model.generate(**inputs, **kwargs))
        out = outcome(lambda: vlmfix.generate(tiny.model, **inputs, **kwargs))
    assert ref[0] == out[0], f"plain generate: {ref}, vlmfix: {out}"
    if ref[0] == "ok":
        assert_same(ref[1], out[1])
    else:
        assert ref[1] is out[1]


@pytest.mark.parametrize("implementation", ["static", "dynamic"])
def test_edits_under_a_static_cache_equal_the_dynamic_cache(implementation):
    """An edited layer reads a static cache's 4-D mask and its unused key slots as a dynamic cache's keys."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)

    def image_bias(session, layer_idx):
        return [KeyBias(abs_gain=session.spans.image[:, None].float() * 2.0),
                Transfer(source=session.spans.image, receivers=session.spans.instruction, fraction=0.5)]

    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    method = PlannedEdits(image_bias, layers=[1, 2])
    dynamic = vlmfix.generate(tiny.model, **inputs, methods=[method], **kwargs)
    other = vlmfix.generate(tiny.model, **inputs, methods=[method], cache_implementation=implementation, **kwargs)
    plain = tiny.model.generate(**inputs, **kwargs)
    assert not torch.allclose(plain.scores[0], dynamic.scores[0])  # the edit changes the step
    assert torch.equal(dynamic.sequences, other.sequences)
    for a, b in zip(dynamic.scores, other.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
