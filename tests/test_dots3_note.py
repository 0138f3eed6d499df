"""Checks beyond the conformance suite (tests/test_conformance.py runs it on Dots3 Note too): its layers' own head
counts, the per-head gate after attention, and that the tiny prompt reaches past the indexer's top-k and the
sliding window (so the suite's row-independence checks cover both)."""

from __future__ import annotations

import torch

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.edits import HeadScale
from vlmfix.testing import build_tiny
from vlmfix.testing import conformance as suite

from .conftest import GREEDY_STEP, PlannedEdits, assert_top_k_selection_matters, zero_bias_everywhere


def test_heads_are_read_per_layer():
    """The tiny build's sliding layers have half the indexed layers' heads; the adapter reads each layer's count
    (checked against its query projection's width) and `num_heads` is the indexed layers' count."""
    tiny = build_tiny("dots3_note", heads=4, head_dim=16)
    adapter = get_adapter(tiny.model)
    types = tiny.model.config.text_config.layer_types
    widths = [adapter.attn(i).q_b_proj.out_features // 16 for i in range(adapter.num_layers)]  # qk head dim 16
    assert [adapter.heads_in(i) for i in range(adapter.num_layers)] == widths
    assert widths == [2 if kind == "sliding_attention" else 4 for kind in types] and "sliding_attention" in types
    assert adapter.num_heads == 4


def test_a_head_scale_inside_attention_equals_the_scale_after_the_gate():
    """A `HeadScale` (VHR's edit) acts on a head's attention output, before the model's sigmoid gate; both are
    per-head factors, so the scores equal those of the plain model whose o_proj input (gated heads) is scaled."""
    tiny = build_tiny("dots3_note")
    adapter = get_adapter(tiny.model)
    inputs = tiny.inputs(list(suite.QUESTIONS))
    batch = inputs["input_ids"].shape[0]
    factors = {0: torch.tensor([1.0, 1.0, 1.0, 3.0]), 2: torch.tensor([0.25, 1.0])}  # indexed, sliding layer

    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=factors[layer].expand(batch, -1))], layers=list(factors))
    with vlmfix.apply(tiny.model, scale, tokenizer=tiny.processor) as session:
        edited = session.generate(**inputs, **GREEDY_STEP).scores[0]

    def scaled_input(layer: int):  # o_proj's input: [batch, seq, heads * v_head_dim], gated
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            (x,) = args
            heads = factors[layer].numel()
            return ((x.unflatten(-1, (heads, -1)) * factors[layer][:, None]).flatten(-2),)
        return hook

    handles = [adapter.o_proj(layer).register_forward_pre_hook(scaled_input(layer)) for layer in factors]
    try:
        reference = tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
    finally:
        for handle in handles:
            handle.remove()
    plain = tiny.model.generate(**inputs, **GREEDY_STEP).scores[0]
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-4)
    assert (edited - plain).abs().max() > 1e-3


def test_vlmfix_attention_in_every_layer_keeps_plain_scores():
    """A zero key bias in every layer runs vlmfix's attention everywhere (the indexed layers' merged top-k, the
    sliding layers' window, values wider than keys) and changes nothing."""
    scores, plain = zero_bias_everywhere(build_tiny("dots3_note"))
    torch.testing.assert_close(scores, plain, atol=1e-5, rtol=1e-4)


def test_the_tiny_prompt_reaches_past_the_top_k_and_the_window():
    """The prompts are longer than the indexer's top-k and the sliding window, and the selection matters: the same
    weights keeping every key (top-k above the prompt length) give other scores."""
    tiny = assert_top_k_selection_matters("dots3_note")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    assert bool((inputs["attention_mask"].sum(dim=1) > tiny.model.config.text_config.sliding_window).all())


def test_an_edited_decode_step_with_values_wider_than_keys_leaves_the_kernel_path():
    """MLA values are wider than keys, which the grouped decode kernels do not take: with kernel="always", PAI's
    decode steps fall back to the SDPA path and give the tokens and scores of kernel="never" (it raised before)."""
    from vlmfix.methods.pai import PAI

    tiny = build_tiny("dots3_note")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    runs = {}
    for mode in ("always", "never"):
        with vlmfix.apply(tiny.model, PAI(cfg=False), tokenizer=tiny.processor, kernel=mode) as session:
            runs[mode] = session.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                          return_dict_in_generate=True)
        assert session.report()["pai"]["applied"]["attention_calls"] > 0  # PAI edited decode steps
    assert torch.equal(runs["always"].sequences, runs["never"].sequences)
    for always, never in zip(runs["always"].scores, runs["never"].scores):
        torch.testing.assert_close(always, never)
