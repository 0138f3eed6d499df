"""Checks beyond the conformance suite (tests/test_conformance.py runs it on HY V4 VL too): its learned attention
sinks on every vlmfix attention path, against a plain-PyTorch reference written here; its hyper-connected readout
(DoLa's early exit through the same collapse); and that the tiny prompt reaches past the indexer's top-k."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.hy_v4_vl.modeling_hy_v4_vl import eager_attention_forward

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.attention import AttentionCall, edited_output
from vlmfix.decoding.edits import KeyBias, Reweight, edited_attention
from vlmfix.methods.dola import DoLa
from vlmfix.methods.image_selection import newest_row_attention
from vlmfix.testing import build_tiny
from vlmfix.testing import conformance as suite

from .conftest import GREEDY_STEP, assert_top_k_selection_matters, zero_bias_everywhere

BATCH, HEADS, KV_LEN, HEAD_DIM = 2, 3, 7, 4


def sink_probabilities(scores, sinks):
    """softmax over [scores, sink] per head, the sink column dropped: scores [batch, heads, q_len, kv_len], sinks
    [heads] -> [batch, heads, q_len, kv_len] (rows sum to less than 1)."""
    sink = sinks[None, :, None, None].expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def reference_attention(query, key, value, mask, scaling, sinks, bias):
    """Plain attention with sinks: softmax over [scores + mask + bias, sink], the sink column dropped, @ values.

    query: [batch, heads, q_len, head_dim]; key, value: [batch, heads, kv_len, head_dim]; mask: [batch, 1, q_len,
    kv_len] additive; sinks: [heads]; bias: [batch, heads, q_len, kv_len]. Returns [batch, q_len, heads, head_dim]."""
    scores = query @ key.transpose(-1, -2) * scaling + mask + bias
    return (sink_probabilities(scores, sinks) @ value).transpose(1, 2)


def random_attention(q_len: int, seed: int = 0):
    """query, key, value, a left-padded causal additive mask (row 1 padded by 2 keys), scaling and sinks."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, HEADS, q_len, HEAD_DIM, generator=generator)
    key = torch.randn(BATCH, HEADS, KV_LEN, HEAD_DIM, generator=generator)
    value = torch.randn(BATCH, HEADS, KV_LEN, HEAD_DIM, generator=generator)
    positions = torch.arange(KV_LEN - q_len, KV_LEN)[:, None]
    visible = torch.arange(KV_LEN)[None, :] <= positions  # [q_len, kv_len]
    visible = visible[None].repeat(BATCH, 1, 1)
    visible[1, :, :2] = False  # left padding
    mask = torch.zeros(BATCH, 1, q_len, KV_LEN).masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
    sinks = torch.tensor([2.0, -1.0, 0.5])
    return query, key, value, mask, HEAD_DIM**-0.5, sinks


class SinkAttention(nn.Module):
    """What HY V4 VL's eager attention reads on its module: the sinks and the key/value grouping."""

    def __init__(self, sinks: torch.Tensor) -> None:
        super().__init__()
        self.sinks = nn.Parameter(sinks.clone())
        self.num_key_value_groups = 1


def test_the_sinks_change_attention():
    """The reference is not blind to the sinks: without them (no sink column) the output differs."""
    query, key, value, mask, scaling, sinks = random_attention(q_len=5)
    zero = torch.zeros(BATCH, HEADS, 5, KV_LEN)
    with_sinks = reference_attention(query, key, value, mask, scaling, sinks, zero)
    without = (torch.softmax(query @ key.transpose(-1, -2) * scaling + mask, -1) @ value).transpose(1, 2)
    assert (with_sinks - without).abs().max() > 1e-2


@pytest.mark.parametrize("q_len", [5, 1])  # a prefill, a decode step
def test_a_key_bias_with_sinks_equals_the_reference(q_len):
    query, key, value, mask, scaling, sinks = random_attention(q_len)
    bias = torch.zeros(BATCH, 1, KV_LEN)
    bias[:, :, 2:5] = 1.5  # three "image" keys
    edit = KeyBias(bias=bias)
    expected = reference_attention(query, key, value, mask, scaling, sinks, bias[:, :, None, :].expand(
        BATCH, HEADS, q_len, KV_LEN))
    got = edited_attention(query, key, value, mask, scaling, [edit], sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_reweight_with_sinks_renormalises_over_the_sink_too():
    """A post-softmax reweight by m, renormalised, equals a logit bias of log m with the sink untouched: the sink
    keeps its place in the denominator (it is a key in no set, multiplier 1)."""
    query, key, value, mask, scaling, sinks = random_attention(q_len=5)
    multiplier = torch.ones(BATCH, HEADS, KV_LEN)
    multiplier[:, :, 2:5] = 3.0
    expected = reference_attention(query, key, value, mask, scaling, sinks,
                                   multiplier.log()[:, :, None, :].expand(BATCH, HEADS, 5, KV_LEN))
    got = edited_attention(query, key, value, mask, scaling, [Reweight(multiplier=multiplier)], sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("q_len", "rows"), [(5, "all"), (5, "last"), (1, "all")])
def test_every_edited_path_of_the_attention_function_adds_the_sinks(q_len, rows):
    """`edited_output` with the layer's `s_aux` (as HY V4 VL passes it) and the model's own eager backend: a full
    prefill, a prefill whose last row only is edited (the backend's rows, then the edit path's last row) and a
    decode step (which would take SDPA or the kernel without sinks) all equal the reference."""
    query, key, value, mask, scaling, sinks = random_attention(q_len)
    bias = torch.zeros(BATCH, 1, KV_LEN)
    bias[:, :, 2:5] = -2.0
    per_row = bias[:, :, None, :].expand(BATCH, HEADS, q_len, KV_LEN).clone()
    if rows == "last":
        per_row[:, :, :-1] = 0.0
    expected = reference_attention(query, key, value, mask, scaling, sinks, per_row)
    module = SinkAttention(sinks)
    got = edited_output(query, key, value, mask, scaling, [KeyBias(bias=bias, rows=rows)], eager_attention_forward,
                        module, s_aux=module.sinks)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_observers_read_probabilities_with_the_sinks():
    """The head-mean attention of the newest row (SID's and DualStream's selection) keeps each sink's share out of
    the keys: it equals the reference probabilities, which sum to less than 1."""
    query, key, value, mask, scaling, sinks = random_attention(q_len=1)
    call = AttentionCall(nn.Identity(), 0, query, key, value, mask, scaling, torch.zeros(BATCH, 1, HEADS, HEAD_DIM),
                         sinks=sinks)
    scores = query @ key.transpose(-1, -2) * scaling + mask
    expected = sink_probabilities(scores, sinks).mean(dim=1)[:, 0]  # [batch, kv_len]
    got = newest_row_attention(call, slice(None))
    torch.testing.assert_close(got, expected)
    assert bool((got.sum(-1) < 0.99).all())


def test_vlmfix_attention_in_every_layer_keeps_plain_scores():
    """A zero key bias in every layer runs vlmfix's attention everywhere (sinks, the merged top-k, the shared
    top-k of the later layers) and changes nothing; the build's sinks are large enough that leaving them out of
    the softmax would show (the same model with zero sinks gives other scores)."""
    tiny = build_tiny("hy_v4_vl")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    scores, plain = zero_bias_everywhere(tiny)
    torch.testing.assert_close(scores, plain, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for layer in get_adapter(tiny.model).decoder_layers:
            layer.self_attn.sinks.zero_()
    # the tiny build's logits are ~0.05; the sinks move them by ~1e-3, 100 times the tolerance above
    assert (tiny.model.generate(**inputs, **GREEDY_STEP).scores[0] - plain).abs().max() > 5e-4


def hidden_inputs(tiny, inputs) -> list[torch.Tensor]:
    """Each decoder layer's input (4 streams) at the newest position, then the last layer's output."""
    adapter = get_adapter(tiny.model)
    captured: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda m, args: captured.append(args[0][:, -1]))
               for layer in adapter.decoder_layers]
    handles.append(adapter.decoder_layers[-1].register_forward_hook(
        lambda m, args, out: captured.append((out[0] if isinstance(out, tuple) else out)[:, -1])))
    try:
        with torch.no_grad():
            logits = tiny.model(**inputs).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return [*captured, logits]


def test_the_readout_collapses_the_streams_before_the_final_norm():
    """The adapter's `stream_collapse` is the model's own readout: lm_head(norm(collapse(last layer's 4 streams)))
    gives the model's logits."""
    tiny = build_tiny("hy_v4_vl")
    adapter = get_adapter(tiny.model)
    *hidden, logits = hidden_inputs(tiny, tiny.inputs(list(suite.QUESTIONS)))
    assert hidden[-1].shape[-2] == tiny.model.config.text_config.hc_mult  # [batch, streams, hidden]
    collapse = adapter.stream_collapse
    assert collapse is not None
    with torch.no_grad():
        readout = tiny.model.lm_head(adapter.language_model.norm(collapse(hidden[-1][None])))[0]
    torch.testing.assert_close(readout, logits, atol=1e-5, rtol=1e-4)


def test_dola_exits_early_through_the_stream_collapse():
    """DoLa with one candidate layer j: its first scores are log_softmax(z_N) - log_softmax(z_j) on the plausible
    tokens, with z_j = lm_head(collapse(h_j)) computed here from the layer's captured input streams."""
    tiny = build_tiny("hy_v4_vl")
    inputs = tiny.inputs(list(suite.QUESTIONS))
    j, relative_top = 2, 0.1
    *hidden, mature = hidden_inputs(tiny, inputs)
    with torch.no_grad():
        premature = tiny.model.lm_head(get_adapter(tiny.model).stream_collapse(hidden[j][None]))[0]
    log_n, log_j = mature.log_softmax(-1), premature.log_softmax(-1)
    plausible = log_n >= log_n.max(-1, keepdim=True).values + math.log(relative_top)
    expected = (log_n - log_j).masked_fill(~plausible, float("-inf"))
    out = vlmfix.generate(tiny.model, **inputs, methods=[DoLa(layers=[j], relative_top=relative_top)],
                          repetition_penalty=1.2, **GREEDY_STEP)
    # generate's repetition penalty runs on the DoLa scores: compare the tokens it leaves alone
    seen = torch.zeros_like(plausible).scatter_(1, inputs["input_ids"], True)
    keep = plausible & ~seen
    assert bool(keep.any())
    torch.testing.assert_close(out.scores[0][keep], expected[keep], atol=1e-4, rtol=1e-4)


def test_the_tiny_prompt_reaches_past_the_top_k():
    """The prompts are longer than the indexer's top-k, and the selection matters: the same weights keeping every
    key give other scores."""
    assert_top_k_selection_matters("hy_v4_vl")


def test_aia_mass_counts_the_sinks():
    """AIA's image-attention mass (training) keeps each sink's share out of the keys, as the reference does."""
    from vlmfix.training.aia import key_subset_mass

    query, key, value, mask, scaling, sinks = random_attention(q_len=5)
    rows = torch.tensor([[2, 4], [3, 4]])  # query rows scored per sample
    subset = torch.zeros(BATCH, KV_LEN, dtype=torch.bool)
    subset[:, 2:5] = True
    scores = query @ key.transpose(-1, -2) * scaling + mask
    probabilities = sink_probabilities(scores, sinks)  # [batch, heads, q_len, kv_len]
    expected = (probabilities * subset[:, None, None]).sum(-1).gather(2, rows[:, None].expand(BATCH, HEADS, 2))
    got = key_subset_mass(query, key, mask, scaling, rows, torch.ones(BATCH, 2, dtype=torch.bool), subset,
                          sinks=sinks)
    torch.testing.assert_close(got, expected)
