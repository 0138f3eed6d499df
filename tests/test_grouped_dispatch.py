"""Decode edits through the grouped kernel (Triton interpreter on CPU) equal the PyTorch edit path."""

from __future__ import annotations

import pytest
import torch

import vlmfix
from vlmfix.decoding.edits import FusionReweight, HeadScale, KeyBias, Reweight, Transfer, edited_attention
from vlmfix.decoding.grouped import KeyGroupCache, compute_key_groups, grouped_decode_output
from vlmfix.kernels import grouped_decode_backend

from .conftest import PlannedEdits, tiny_model

B, H, D, PROMPT, KV = 2, 4, 64, 40, 47  # kv_len > prompt: 7 generated keys belong to no set
PAD = [0, 5]


def sets() -> dict[str, torch.Tensor]:
    image = torch.zeros(B, PROMPT, dtype=torch.bool)
    image[0, 4:24] = True
    image[1, 10:30] = True
    sink = torch.zeros(B, PROMPT, dtype=torch.bool)
    sink[0, [0, 6, 9]] = True
    sink[1, [5, 12, 33]] = True
    query = torch.zeros(B, PROMPT, dtype=torch.bool)
    query[0, 26:36] = True
    query[1, 31:38] = True
    return {"image": image, "sink": sink, "query": query}


def inputs(kv_heads: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, 1, D, generator=g, dtype=dtype)
    k = (torch.randn(B, kv_heads, KV, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, kv_heads, KV, D, generator=g, dtype=dtype)
    valid = torch.tensor([[j >= PAD[b] for j in range(KV)] for b in range(B)])
    mask = valid[:, None, None, :]  # sdpa-style bool decode mask
    return q, k, v, mask


def edit_cases():
    s = sets()
    mult = torch.where(s["image"], torch.exp(torch.linspace(0, 1.5, PROMPT)).expand(B, PROMPT), 1.0)
    heads_gain = torch.tensor([0.1, 0.5, 0.0, 0.9])[None, :, None] * s["image"][:, None].float()
    return {
        "pai": [KeyBias(abs_gain=s["image"][:, None].float() * 0.4, rows="last")],
        "bias-per-head": [KeyBias(bias=heads_gain, abs_gain=heads_gain)],
        "var": [Transfer(source=s["sink"], receivers=s["image"] & ~s["sink"], gate_keys=s["image"], fraction=0.6,
                         min_gate_mass=0.05, min_receiver_share=0.3, require_gate_source=True)],
        "gift": [FusionReweight(image=s["image"], multiplier=mult, query=s["query"], beta=0.7, rows="last")],
        "reweight": [Reweight(multiplier=mult[:, None], top_heads_by=s["image"], top_heads=2)],
        "vhr": [HeadScale(scale=torch.tensor([[1.0, 1.5, 1.0, 1.0], [2.0, 1.0, 1.0, 0.5]]))],
        "var+gift+pai+vhr": [
            KeyBias(abs_gain=s["image"][:, None].float() * 0.3),
            Transfer(source=s["sink"], receivers=s["image"] & ~s["sink"], gate_keys=s["image"], fraction=0.5),
            FusionReweight(image=s["image"], multiplier=mult, query=s["query"]),
            HeadScale(scale=torch.full((B, H), 1.2)),
        ],
    }


def test_interpreter_is_exercised():
    assert grouped_decode_backend("cpu") == "triton-interpret", "conftest must enable the Triton interpreter"


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", list(edit_cases()))
def test_grouped_equals_pytorch_edit_path(case, kv_heads):
    edits = edit_cases()[case]
    q, k, v, mask = inputs(kv_heads)
    before = [t.clone() for t in (q, k, v)]
    got = grouped_decode_output(q, k, v, mask, None, edits)
    assert got is not None, "these edits fit the grouped form"
    want = edited_attention(q, k, v, mask, None, edits)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_unsupported_combination_falls_back():
    s = sets()
    m1 = torch.where(s["image"], 2.0, 1.0)
    m2 = torch.where(s["image"], 3.0, 1.0)
    edits = [Reweight(multiplier=m1[:, None]), Reweight(multiplier=m2[:, None])]
    q, k, v, mask = inputs(4)
    assert grouped_decode_output(q, k, v, mask, None, edits) is None


def test_generation_with_kernel_matches_pytorch_path():
    tiny = tiny_model("llava")
    batch = tiny.inputs(["describe this image .", "is there a dog in the picture ?"])

    def plan(session, layer_idx):
        spans = session.spans
        return [KeyBias(abs_gain=spans.image[:, None].float() * 0.5, rows="last"),
                Transfer(source=spans.image & (spans.image.cumsum(1) <= 2), receivers=spans.image
                         & (spans.image.cumsum(1) > 2), fraction=0.4)]

    runs = {mode: vlmfix.generate(tiny.model, **batch, methods=[PlannedEdits(plan, layers=[1, 2])], kernel=mode,
                                  max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                  output_scores=True) for mode in ("never", "always")}
    assert torch.equal(runs["never"].sequences, runs["always"].sequences)
    for a, b in zip(runs["never"].scores, runs["always"].scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(edit_cases()))
def test_cached_key_groups_equal_groups_derived_at_each_step(case):
    """Across decode steps (kv_len growing past the prompt) the cache's groups are the from-scratch
    groups, and one edit list is derived once."""
    edits = edit_cases()[case]
    cache = KeyGroupCache()
    for kv_len in (PROMPT + 1, PROMPT + 2, KV, KV + 5):
        valid = torch.tensor([[j >= PAD[b] for j in range(kv_len)] for b in range(B)])
        got = cache.get(edits, B, H, kv_len, valid)
        want = compute_key_groups(edits, B, H, kv_len, valid)
        assert got.count == want.count and torch.equal(got.ids, want.ids)
        assert (got.multiplier is None) == (want.multiplier is None)
        if want.multiplier is not None:
            assert torch.equal(got.multiplier, want.multiplier)
    assert len(cache._entries) == 1


def test_cached_path_equals_pytorch_path_over_steps():
    """Memoised per-group values (membership, biases) stay right as keys are added."""
    edits = edit_cases()["var+gift+pai+vhr"]
    cache = KeyGroupCache()
    for kv_len in (PROMPT + 1, KV):
        q, k, v, mask = inputs(2)
        k, v, mask = k[:, :, :kv_len], v[:, :, :kv_len], mask[..., :kv_len]
        got = grouped_decode_output(q, k, v, mask, None, edits, cache)
        torch.testing.assert_close(got, edited_attention(q, k, v, mask, None, edits), atol=2e-5, rtol=2e-4)


def test_cache_remembers_unsupported_edits_and_refills_on_new_padding():
    s = sets()
    twice = [Reweight(multiplier=torch.where(s["image"], 2.0, 1.0)[:, None]),
             Reweight(multiplier=torch.where(s["image"], 3.0, 1.0)[:, None])]
    q, k, v, mask = inputs(4)
    cache = KeyGroupCache()
    assert grouped_decode_output(q, k, v, mask, None, twice, cache) is None
    assert grouped_decode_output(q, k, v, mask, None, twice, cache) is None
    edits = edit_cases()["var"]
    valid = torch.ones(B, KV, dtype=torch.bool)
    cache.get(edits, B, H, KV, valid)
    valid[1, :3] = False  # same edit objects, other padding: derived again, not reused
    assert torch.equal(cache.get(edits, B, H, KV, valid).ids, compute_key_groups(edits, B, H, KV, valid).ids)


def test_generation_with_kernel_and_edits_planned_once_per_prompt():
    """Methods plan edits once per prompt, so the session's cache serves every decode step."""
    tiny = tiny_model("llava")
    batch = tiny.inputs(["describe this image .", "is there a dog in the picture ?"])
    planned = {}

    def plan(session, layer_idx):
        if session.prompts_seen not in planned:
            spans = session.spans
            planned[session.prompts_seen] = [
                KeyBias(abs_gain=spans.image[:, None].float() * 0.5, rows="last"),
                Transfer(source=spans.image & (spans.image.cumsum(1) <= 2),
                         receivers=spans.image & (spans.image.cumsum(1) > 2), fraction=0.4)]
        return planned[session.prompts_seen]

    runs = {}
    for mode in ("never", "always"):
        planned.clear()
        with vlmfix.apply(tiny.model, PlannedEdits(plan, layers=[1, 2]), kernel=mode) as session:
            runs[mode] = tiny.model.generate(**batch, max_new_tokens=6, do_sample=False)
            if mode == "always":  # one edit list, reused by both layers and every step
                assert len(session.key_groups._entries) == 1
        assert not session.key_groups._entries  # released on exit
    assert torch.equal(runs["never"], runs["always"])


def test_kernel_mode_is_validated():
    with pytest.raises(ValueError, match=r"`kernel` must be one of 'auto', 'always', 'never', got 'sometimes'"):
        vlmfix.apply(tiny_model("llava").model, kernel="sometimes")
