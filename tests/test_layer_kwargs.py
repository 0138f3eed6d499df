"""The edit path honours the attention layer's own softcap and sliding window (Gemma 2 / 3 layers)."""

from __future__ import annotations

import torch

from vlmfix.decoding.edits import KeyBias, edited_attention


def reference(q, k, v, scaling, softcap=None, window=None):
    """Plain attention: [batch, heads, q_len, d] -> [batch, q_len, heads, d]; causal, optional cap and window."""
    z = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    q_len, kv_len = q.shape[2], k.shape[2]
    qi = torch.arange(kv_len - q_len, kv_len)[:, None]
    ki = torch.arange(kv_len)[None]
    allowed = ki <= qi
    if window is not None:
        allowed &= qi - ki < window
    z = z.masked_fill(~allowed, float("-inf"))
    return (z.softmax(-1) @ v).transpose(1, 2)


def test_softcap_and_sliding_window_match_a_plain_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4) * 3 for _ in range(3))
    zero = KeyBias(bias=torch.zeros(1, 1, 5))  # an edit that changes nothing: the edit path runs
    plain = edited_attention(q, k, v, None, 0.5, [zero])
    capped = edited_attention(q, k, v, None, 0.5, [zero], softcap=1.0)
    windowed = edited_attention(q, k, v, None, 0.5, [zero], sliding_window=2)
    torch.testing.assert_close(plain, reference(q, k, v, 0.5))
    torch.testing.assert_close(capped, reference(q, k, v, 0.5, softcap=1.0))
    torch.testing.assert_close(windowed, reference(q, k, v, 0.5, window=2))
    assert not torch.allclose(capped, plain) and not torch.allclose(windowed, plain)


def test_a_given_mask_already_holds_the_window():
    """With a mask (what transformers builds for a sliding layer), the window is not applied twice."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 4) for _ in range(3))
    full = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]  # [1, 1, q_len, kv_len] causal, no window
    out = edited_attention(q, k, v, full, 0.5, [KeyBias(bias=torch.zeros(1, 1, 4))], sliding_window=1)
    torch.testing.assert_close(out, reference(q, k, v, 0.5))


def test_a_sliding_cache_is_laid_out_over_the_whole_sequence():
    """A sliding-window cache keeps the last 3 of 7 keys: laid out over the 7 positions, attention is unchanged
    and a bias planned for sequence position 5 meets the key at position 5."""
    from vlmfix.decoding.attention import uncropped

    torch.manual_seed(2)
    q = torch.randn(1, 2, 1, 4)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)  # positions 4, 5, 6
    full_k, full_v, mask = uncropped(k, v, None, 7, 1)
    assert full_k.shape == (1, 2, 7, 4) and torch.equal(full_k[:, :, 4:], k)
    plain = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1) @ v  # [1, 2, 1, 4]
    zero = KeyBias(bias=torch.zeros(1, 1, 7))
    out = edited_attention(q, full_k, full_v, mask, 0.5, [zero])
    torch.testing.assert_close(out, plain.transpose(1, 2))
    bias = torch.zeros(1, 1, 7)
    bias[..., 5] = 3.0
    z = (q @ k.transpose(-1, -2)) * 0.5
    z[..., 1] += 3.0  # position 5 is the second kept key
    torch.testing.assert_close(edited_attention(q, full_k, full_v, mask, 0.5, [KeyBias(bias=bias)]),
                               (z.softmax(-1) @ v).transpose(1, 2))


def test_a_sliding_cache_of_values_wider_than_keys_is_laid_out_too():
    """MLA layers (Dots3 Note's sliding ones) cache values of another width than keys: each keeps its own width,
    and attention over the laid-out cache is the attention over the kept keys."""
    from vlmfix.decoding.attention import uncropped

    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 8)
    full_k, full_v, mask = uncropped(k, v, None, 7, 1)
    assert full_k.shape == (1, 2, 7, 4) and full_v.shape == (1, 2, 7, 8) and torch.equal(full_v[:, :, 4:], v)
    plain = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1) @ v  # [1, 2, 1, 8]
    out = edited_attention(q, full_k, full_v, mask, 0.5, [KeyBias(bias=torch.zeros(1, 1, 7))])
    torch.testing.assert_close(out, plain.transpose(1, 2))


def test_a_top_k_key_selection_restricts_each_query_to_its_keys():
    """A sparse-attention layer's `indices` (each query's kept keys) merged into a bool or an additive mask: the
    edited path attends to exactly the selected, causally visible keys of each query, as a per-query loop does."""
    from vlmfix.decoding.attention import with_selected_keys

    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    indices = torch.stack([torch.randperm(5)[:3] for _ in range(10)]).view(2, 5, 3).to(torch.int32)
    expected = torch.empty(2, 5, 2, 4)
    for b in range(2):
        for i in range(5):
            keys = sorted(j for j in indices[b, i].tolist() if j <= i)  # query 0 keeps key 0 only if selected
            if not keys:
                expected[b, i] = 0.0
                continue
            z = (q[b, :, i : i + 1] @ k[b, :, keys].transpose(-1, -2)) * 0.5  # [heads, 1, kept]
            expected[b, i] = (z.softmax(-1) @ v[b, :, keys])[:, 0]
    zero = [KeyBias(bias=torch.zeros(2, 1, 5))]
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    for mask in (causal, additive):
        merged = with_selected_keys(mask, indices, 5)
        assert merged.dtype == mask.dtype and merged.shape == (2, 1, 5, 5)
        out = edited_attention(q, k, v, merged, 0.5, zero)
        torch.testing.assert_close(out, expected)
