"""One query row edited by key biases only (PAI) through SDPA with an additive bias, against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.edits import HeadScale, KeyBias, Reweight
from vlmfix.decoding.key_bias import KeyBiasPlans, key_bias_row_output, plan_key_biases
from vlmfix.methods.pai import PAI

from .conftest import tiny_model
from .reference_decoding import QUESTIONS, assert_unchanged, snapshot

B, H, D, PROMPT, KV = 2, 4, 16, 30, 35  # kv_len > prompt: 5 generated keys take no bias
PAD = [0, 4]


def image_keys() -> Tensor:
    image = torch.zeros(B, PROMPT, dtype=torch.bool)
    image[0, 3:20] = True
    image[1, 8:25] = True
    return image


def row_inputs(kv_heads: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = (torch.randn(B, kv_heads, KV, D, generator=g) * 2.0).to(dtype)
    v = torch.randn(B, kv_heads, KV, D, generator=g).to(dtype)
    return q, k, v


def reference(q, k, v, visible, scaling, bias, gain, selected, head_scale=None):
    """The spec, key by key: z = scaling q.k; on selected rows z + bias + gain |z|; masked keys out; softmax;
    @ v; head scale. visible: [B, KV] bool; bias, gain: [B, H, PROMPT]; selected: [B] bool."""
    k = k.float().repeat_interleave(H // k.shape[1], dim=1)
    v = v.float().repeat_interleave(H // v.shape[1], dim=1)
    out = torch.zeros(B, 1, H, D)
    for b in range(B):
        for h in range(H):
            z = (k[b, h] @ q[b, h, 0].float()) * scaling  # [KV]
            if selected[b]:
                z = z.clone()
                z[:PROMPT] = z[:PROMPT] + bias[b, h] + gain[b, h] * z[:PROMPT].abs()
            z = z.masked_fill(~visible[b], -math.inf)
            out[b, 0, h] = torch.softmax(z, -1) @ v[b, h]
            if head_scale is not None:
                out[b, 0, h] *= head_scale[b, h]
    return out


def padding_visible() -> Tensor:
    return torch.tensor([[j >= PAD[b] for j in range(KV)] for b in range(B)])


@pytest.mark.parametrize("kv_heads", [H, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", ["none", "padding-2d", "bool-4d", "bool-4d-heads", "bool-4d-one-row", "float-4d"])
def test_matches_reference(kv_heads, mask_kind):
    q, k, v = row_inputs(kv_heads)
    before = snapshot({"q": q, "k": k, "v": v})
    image = image_keys()
    gain = image[:, None].float() * torch.tensor([0.5, 0.0, 1.0, 2.0])[None, :, None]  # [B, H, PROMPT]: per head
    bias = torch.zeros(B, 1, PROMPT)
    bias[:, :, 25:28] = -1.5  # a constant bias on keys outside the image
    edits = [KeyBias(abs_gain=gain, rows="last"), KeyBias(bias=bias)]
    visible = padding_visible() if mask_kind != "none" else torch.ones(B, KV, dtype=torch.bool)
    if mask_kind == "bool-4d-one-row":  # one mask row for the whole batch: [1, 1, 1, KV]
        visible = padding_visible()[1:].expand(B, KV)
    mask = {"none": None, "padding-2d": visible.long(), "bool-4d": visible[:, None, None, :],
            "bool-4d-heads": visible[:, None, None, :].expand(B, H, 1, KV), "bool-4d-one-row": visible[:1, None, None],
            "float-4d": torch.zeros(B, 1, 1, KV).masked_fill(~visible[:, None, None, :], torch.finfo(torch.float).min)
            }[mask_kind]
    out = key_bias_row_output(q, k, v, mask, 0.3, edits)
    want = reference(q, k, v, visible, 0.3, bias.expand(B, H, PROMPT), gain, torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
    assert (out - reference(q, k, v, visible, 0.3, torch.zeros(B, H, PROMPT), torch.zeros(B, H, PROMPT),
                            torch.ones(B, dtype=torch.bool))).abs().max() > 1e-2  # the biases do change it
    assert_unchanged({"q": q, "k": k, "v": v}, before)


def test_from_position_sliding_window_and_head_scale():
    q, k, v = row_inputs(2)
    gain = image_keys()[:, None].float() * 0.8
    start = torch.tensor([KV, KV - 1])  # row 0's newest row (position KV - 1) is before its start: unedited
    scale = torch.tensor([[1.0, 2.0, 1.0, 0.5], [1.5, 1.0, 1.0, 1.0]])
    edits = [KeyBias(abs_gain=gain, rows="last", from_position=start), HeadScale(scale=scale)]
    out = key_bias_row_output(q, k, v, None, None, edits, sliding_window=KV - 6)  # keys 0..5 outside the window
    visible = torch.ones(B, KV, dtype=torch.bool)
    visible[:, :6] = False
    want = reference(q, k, v, visible, D**-0.5, torch.zeros(B, H, PROMPT), gain.expand(B, H, PROMPT),
                     torch.tensor([False, True]), head_scale=scale)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


def test_values_wider_than_keys():
    """MLA layers (Dots3 Note's) read values of another width than the keys: the output takes the values' width."""
    q, k, _ = row_inputs(2)
    v = torch.randn(B, 2, KV, 2 * D, generator=torch.Generator().manual_seed(9))
    gain = image_keys()[:, None].float() * 0.8
    out = key_bias_row_output(q, k, v, None, 0.3, [KeyBias(abs_gain=gain)])
    z = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3  # [B, H, 1, KV]
    z[..., :PROMPT] += gain[:, :, None] * z[..., :PROMPT].abs()
    want = (torch.softmax(z, -1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)  # [B, 1, H, 2D]
    assert out is not None and out.shape == (B, 1, H, 2 * D)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_cache_within_rounding(dtype):
    """A bf16/fp16 model (on CUDA too, where SDPA takes the mask in the query's dtype): the biases are added in the
    query's dtype, and the output stays within that dtype's rounding of the fp32 reference."""
    q, k, v = row_inputs(2, dtype)
    gain = image_keys()[:, None].float() * 0.8
    out = key_bias_row_output(q, k, v, padding_visible()[:, None, None, :], None, [KeyBias(abs_gain=gain)])
    want = reference(q, k, v, padding_visible(), D**-0.5, torch.zeros(B, H, PROMPT), gain.expand(B, H, PROMPT),
                     torch.ones(B, dtype=torch.bool))
    unboosted = reference(q, k, v, padding_visible(), D**-0.5, torch.zeros(B, H, PROMPT), torch.zeros(B, H, PROMPT),
                          torch.ones(B, dtype=torch.bool))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    assert (out.float() - want).abs().max() < 0.1 * (want - unboosted).abs().max()  # rounding, well below the boost


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels need a GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_reduced_precision_matches_reference(dtype):
    """On CUDA SDPA takes the mask only in the query's dtype: the same path, within that dtype's rounding."""
    q, k, v = row_inputs(2, dtype)
    gain = image_keys()[:, None].float() * 0.8
    mask = padding_visible()[:, None, None, :]
    out = key_bias_row_output(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), None, [KeyBias(abs_gain=gain.cuda())])
    want = reference(q, k, v, padding_visible(), D**-0.5, torch.zeros(B, H, PROMPT), gain.expand(B, H, PROMPT),
                     torch.ones(B, dtype=torch.bool))
    assert out is not None and out.dtype == dtype and out.is_cuda
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.float().cpu(), want, atol=tolerance, rtol=tolerance)


def test_other_edits_are_left_to_the_pytorch_path():
    q, k, v = row_inputs(H)
    image = image_keys()
    reweight = Reweight(multiplier=torch.where(image, 2.0, 1.0)[:, None])
    assert key_bias_row_output(q, k, v, None, None, [KeyBias(abs_gain=image[:, None].float()), reweight]) is None
    assert key_bias_row_output(q, k, v, None, None, [HeadScale(scale=torch.ones(B, H))]) is None
    two_rows = q.expand(B, H, 2, D)
    assert key_bias_row_output(two_rows, k, v, None, None, [KeyBias(abs_gain=image[:, None].float())]) is None


def test_plan_holds_the_span_of_biased_keys_once_per_edit_list():
    image = image_keys()
    edit = KeyBias(abs_gain=image[:, None].float() * 0.2)
    plan = plan_key_biases([edit], 4, torch.device("cpu"))  # a batch of 4: each planned row twice (beams)
    assert plan is not None and (plan.start, plan.stop) == (3, 25)
    (term,) = plan.terms
    assert term.gain is not None and term.gain.shape == (4, 1, 1, 22) and term.bias is None
    assert torch.equal(term.gain[2, 0, 0], image[1, 3:25].float() * 0.2)
    plans = KeyBiasPlans()
    assert plans.get([edit], 2, torch.device("cpu")) is plans.get([edit], 2, torch.device("cpu"))
    nothing = plan_key_biases([KeyBias(abs_gain=torch.zeros(B, 1, PROMPT))], B, torch.device("cpu"))
    assert nothing is not None and nothing.start == nothing.stop


@pytest.mark.parametrize(("family", "cfg"), [("qwen2_vl", False), ("gemma3", False), ("qwen2_vl", True)])
def test_pai_decode_steps_equal_the_pytorch_edit_path(family, cfg):
    """PAI through the one-row SDPA path (plans reused over layers and steps; with the refinement, one SDPA call
    over both streams' rows) against the same decode with the plain PyTorch edit path (the plans switched off),
    fp32: same tokens, scores within rounding."""
    tiny = tiny_model(family, layers=4)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)

    def run(fast: bool):
        with vlmfix.apply(tiny.model, PAI(alpha=3.0, cfg=cfg), tokenizer=tiny.processor) as session:
            if not fast:
                session.key_bias_plans.get = lambda *args: None  # type: ignore[method-assign]
            out = session.generate(**inputs, **kwargs)
            if fast:
                assert len(session.key_bias_plans._entries) == 1  # one plan for every layer and step
        assert session.report()["pai"]["applied"]["attention_calls"] > 0
        return out

    fast, slow = run(True), run(False)
    assert torch.equal(fast.sequences, slow.sequences)
    fast_scores, slow_scores = torch.stack(fast.logits), torch.stack(slow.logits)
    assert torch.equal(fast_scores.isinf(), slow_scores.isinf())  # the refinement's cutoff removes the same tokens
    finite = ~slow_scores.isinf()
    torch.testing.assert_close(fast_scores[finite], slow_scores[finite], atol=1e-5, rtol=1e-5)
    assert_unchanged(inputs, before)


def test_a_plan_is_never_served_to_a_new_edit_list_that_reuses_an_old_ones_id():
    """A method that builds new edits per step frees the old ones; CPython hands their memory (and id) to the
    next edit object at once, so a cache keyed by ids alone would serve that new edit the freed one's plan."""
    plans, cpu = KeyBiasPlans(), torch.device("cpu")
    for step in range(20):
        first_key = step % (PROMPT - 1)
        bias = torch.zeros(B, 1, PROMPT)
        bias[:, :, first_key:] = -1.0  # a different span of biased keys each step
        edit = KeyBias(bias=bias)
        plan = plans.get([edit], B, cpu)
        assert plan is not None and (plan.start, plan.stop) == (first_key, PROMPT)
        del edit, plan  # the edit list of this step is gone
