"""Each edit kind against a reference computed by hand, one (row, head, query) at a time, from q, k, v."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from vlmfix.decoding.edits import FusionReweight, HeadScale, KeyBias, Reweight, Transfer, edited_attention

B, H, D, T = 2, 4, 8, 9
PAD = [0, 3]  # left padding per row


def make_qkv(kv_heads: int, q_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=g)
    k = torch.randn(B, kv_heads, T, D, generator=g) * 2
    v = torch.randn(B, kv_heads, T, D, generator=g)
    return q, k, v


def valid_keys() -> torch.Tensor:
    return torch.tensor([[j >= PAD[b] for j in range(T)] for b in range(B)])


def bool_mask(q_len: int) -> torch.Tensor:
    """sdpa-style [B, 1, q_len, T] bool mask: causal (bottom-right) and left padding."""
    qpos = torch.arange(T - q_len, T)[:, None]
    causal = torch.arange(T)[None, :] <= qpos
    return (causal[None] & valid_keys()[:, None, :])[:, None]


# key sets over the prompt, per row (positions in padded coordinates)
IMAGE = torch.zeros(B, T, dtype=torch.bool)
IMAGE[0, 2:6] = True
IMAGE[1, 4:7] = True
QUERY = torch.zeros(B, T, dtype=torch.bool)
QUERY[0, 6:8] = True
QUERY[1, 7:9] = True
SINK = torch.zeros(B, T, dtype=torch.bool)
SINK[0, [0, 3]] = True
SINK[1, [3, 5]] = True


def reference(q, k, v, q_len, edit_kind, **p):
    """Naive loops: for each (b, h, i) build the score row, edit it as the spec says, softmax, P @ V."""
    out = torch.zeros(B, q_len, H, D)
    group = H // k.shape[1]
    valid = valid_keys()
    for b in range(B):
        for h in range(H):
            for i in range(q_len):
                qpos = T - q_len + i
                keys = [j for j in range(T) if j <= qpos and valid[b, j]]
                if not keys:
                    continue
                z = {j: float(q[b, h, i] @ k[b, h // group, j]) / math.sqrt(D) for j in keys}
                edit_row = p.get("last_only") is not True or i == q_len - 1
                if edit_kind == "bias" and edit_row:
                    z = {j: z[j] + float(p["bias"][b, h, j]) + float(p["gain"][b, h, j]) * abs(z[j]) for j in keys}
                zmax = max(z.values())
                e = {j: math.exp(z[j] - zmax) for j in keys}
                s = sum(e.values())
                prob = {j: e[j] / s for j in keys}
                if edit_kind == "transfer" and edit_row:
                    # VAR, spec var.md steps 2-3: sinks S, visual I_vis, visual non-sink = I_vis \ S
                    vis = [j for j in keys if IMAGE[b, j]]
                    vs = [j for j in keys if IMAGE[b, j] and SINK[b, j]]
                    vn = [j for j in vis if j not in vs]
                    ts = [j for j in keys if SINK[b, j] and not IMAGE[b, j]]
                    m_vis = sum(prob[j] for j in vis)
                    m_vn = sum(prob[j] for j in vn)
                    m_s = sum(prob[j] for j in vs + ts)
                    r = m_vn / m_vis if m_vis > 0 else 0.0
                    if m_vis >= p["summ"] and r >= p["rho"] and bool((SINK[b] & IMAGE[b]).any()) and m_vn > 0:
                        omega = p["p"] * m_s
                        for j in vs + ts:
                            prob[j] *= 1 - p["p"]
                        for j in vn:
                            prob[j] *= 1 + omega / m_vn
                if edit_kind == "reweight" and edit_row:
                    masses = []
                    for hh in range(H):  # head choice from each head's own row
                        zz = {j: float(q[b, hh, i] @ k[b, hh // group, j]) / math.sqrt(D) for j in keys}
                        mm = max(zz.values())
                        ee = {j: math.exp(zz[j] - mm) for j in keys}
                        masses.append(sum(ee[j] for j in keys if IMAGE[b, j]) / sum(ee.values()))
                    top = sorted(range(H), key=lambda x: -masses[x])[: p["top"]]
                    if h in top:
                        prob = {j: prob[j] * float(p["mult"][b, j]) for j in keys}
                        tot = sum(prob.values())
                        prob = {j: x / tot for j, x in prob.items()}
                if edit_kind == "fusion" and edit_row:
                    # GIFT, spec gift.md step 6, done for all heads of the row at once
                    rows = []
                    for hh in range(H):
                        zz = {j: float(q[b, hh, i] @ k[b, hh // group, j]) / math.sqrt(D) for j in keys}
                        mm = max(zz.values())
                        ee = {j: math.exp(zz[j] - mm) for j in keys}
                        tt = sum(ee.values())
                        rows.append({j: ee[j] / tt for j in keys})
                    vis_mass = [sum(r[j] for j in keys if IMAGE[b, j]) for r in rows]
                    qry_mass = [sum(r[j] for j in keys if QUERY[b, j]) for r in rows]
                    h_ov = sorted(range(H), key=lambda x: -vis_mass[x])[: H // 2]
                    h_ot = sorted(range(H), key=lambda x: -qry_mass[x])[: H // 2]
                    o = sum(vis_mass[x] for x in h_ov)
                    e_ = sum(rows[x][j] * float(p["mult"][b, j]) for x in h_ov for j in keys if IMAGE[b, j])
                    r = e_ / o if o > 0 else 1.0
                    if h in h_ov:
                        prob = {j: prob[j] * (float(p["mult"][b, j]) if IMAGE[b, j] else 1.0) for j in keys}
                    if h in h_ot:
                        prob = {j: prob[j] * (p["beta"] * r if QUERY[b, j] else 1.0) for j in keys}
                    if h in h_ov or h in h_ot:
                        tot = sum(prob.values())
                        prob = {j: x / tot for j, x in prob.items()}
                o_vec = sum(prob[j] * v[b, h // group, j] for j in keys)
                if edit_kind == "scale":
                    o_vec = o_vec * float(p["scale"][b, h])
                out[b, i, h] = o_vec
    return out


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def kv_heads(request):
    return request.param


@pytest.fixture(params=["prefill-none-mask", "prefill-bool-mask", "decode"])
def phase(request):
    return request.param


def run(edit, kv_heads, phase):
    q_len = 1 if phase == "decode" else T
    q, k, v = make_qkv(kv_heads, q_len)
    if phase == "prefill-none-mask":
        # None means causal; padding must then come from nowhere, so use unpadded keys in the reference
        mask = None
    else:
        mask = bool_mask(q_len)
    snapshot = [t.clone() for t in (q, k, v)]
    out = edited_attention(q, k, v, mask, None, [edit])
    for before, after in zip(snapshot, (q, k, v)):
        assert torch.equal(before, after), "inputs were modified in place"
    return q, k, v, q_len, out


@pytest.fixture(autouse=True)
def _padding_for_phase(phase, monkeypatch):
    # with a None mask there is no padding information: the reference sees every key as valid
    if phase == "prefill-none-mask":
        monkeypatch.setattr(sys.modules[__name__], "PAD", [0, 0])


def test_key_bias_and_abs_gain(kv_heads, phase):
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(B, H, T, generator=g) * IMAGE[:, None]
    gain = torch.rand(B, H, T, generator=g) * IMAGE[:, None]
    q, k, v, q_len, out = run(KeyBias(bias=bias, abs_gain=gain, rows="last"), kv_heads, phase)
    ref = reference(q, k, v, q_len, "bias", bias=bias, gain=gain, last_only=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_key_bias_broadcast_over_heads(kv_heads, phase):
    bias = (IMAGE.float() * 0.7)[:, None]  # [B, 1, T]
    q, k, v, q_len, out = run(KeyBias(bias=bias), kv_heads, phase)
    ref = reference(q, k, v, q_len, "bias", bias=bias.expand(B, H, T), gain=torch.zeros(B, H, T))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p_frac,summ,rho", [(0.6, 0.0, 0.0), (0.6, 0.2, 0.3), (1.0, 0.0, 0.5)])
def test_transfer_matches_var_formula(kv_heads, phase, p_frac, summ, rho):
    edit = Transfer(source=SINK, receivers=IMAGE & ~SINK, gate_keys=IMAGE, fraction=p_frac, min_gate_mass=summ,
                    min_receiver_share=rho, require_gate_source=True)
    q, k, v, q_len, out = run(edit, kv_heads, phase)
    ref = reference(q, k, v, q_len, "transfer", p=p_frac, summ=summ, rho=rho)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reweight_top_heads(kv_heads, phase):
    mult = torch.where(IMAGE, torch.linspace(0.5, 3.0, T).expand(B, T), torch.ones(B, T))
    edit = Reweight(multiplier=mult[:, None], top_heads_by=IMAGE, top_heads=2)
    q, k, v, q_len, out = run(edit, kv_heads, phase)
    ref = reference(q, k, v, q_len, "reweight", mult=mult, top=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_fusion_matches_gift_steps(kv_heads, phase, beta):
    mult = torch.where(IMAGE, torch.exp(torch.linspace(0, 2, T)).expand(B, T), torch.ones(B, T))
    edit = FusionReweight(image=IMAGE, multiplier=mult, query=QUERY, beta=beta, rows="last")
    q, k, v, q_len, out = run(edit, kv_heads, phase)
    ref = reference(q, k, v, q_len, "fusion", mult=mult, beta=beta, last_only=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_head_scale(kv_heads, phase):
    scale = torch.tensor([[1.0, 2.0, 0.5, 1.0], [3.0, 1.0, 1.0, 0.0]])
    q, k, v, q_len, out = run(HeadScale(scale=scale), kv_heads, phase)
    ref = reference(q, k, v, q_len, "scale", scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_transfer_conserves_mass_and_identity_at_zero():
    """Row sums stay 1 after a transfer; fraction 0 is the identity."""
    from vlmfix.decoding.edits import apply_transfer

    p = torch.softmax(torch.randn(B, H, T, T), dim=-1)
    edited = torch.ones(B, H, T, dtype=torch.bool)
    moved = apply_transfer(p, Transfer(source=SINK, receivers=IMAGE & ~SINK, fraction=0.7), edited)
    torch.testing.assert_close(moved.sum(-1), torch.ones(B, H, T))
    assert not torch.allclose(moved, p)
    same = apply_transfer(p, Transfer(source=SINK, receivers=IMAGE & ~SINK, fraction=0.0), edited)
    torch.testing.assert_close(same, p)


def test_invalid_edit_arguments():
    with pytest.raises(ValueError, match="fraction must be in"):
        Transfer(source=SINK, receivers=IMAGE, fraction=1.5)
    with pytest.raises(ValueError, match="rows must be"):
        KeyBias(bias=torch.zeros(B, 1, T), rows="first")


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("scope", ["all", "last", "from_position"])
def test_head_scale_touches_only_the_rows_it_selects(q_len, scope):
    """scale_heads multiplies each selected (row, query) by its heads' scales and leaves the others as they were,
    element by element: every row, the newest query only, or the queries at or past each row's start position."""
    from vlmfix.decoding.edits import scale_heads

    scale = torch.tensor([[1.0, 2.0, 0.5, 1.0], [3.0, 1.0, 1.0, 0.0]])
    start = torch.tensor([T - 2, T])  # row 0: its last two positions; row 1: none
    edit = HeadScale(scale=scale, rows="last" if scope == "last" else "all",
                     from_position=start if scope == "from_position" else None)
    out = torch.randn(B, q_len, H, D)
    scaled = scale_heads(out, [edit], T)
    for b in range(B):
        for i in range(q_len):
            position = T - q_len + i
            chosen = {"all": True, "last": i == q_len - 1, "from_position": position >= int(start[b])}[scope]
            want = out[b, i] * scale[b][:, None] if chosen else out[b, i]
            torch.testing.assert_close(scaled[b, i], want, atol=0, rtol=0)
