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
