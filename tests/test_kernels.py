"""vlmfix.kernels: the grouped decode-attention kernel against its reference, and the library's edited decode
step (`grouped_decode_output`: the kernel plus the edit vocabulary's closed forms) against each method's edit.

Without CUDA the Triton kernel runs under triton's interpreter, which must be chosen before anything imports
triton: run `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py` (tests/conftest.py's imports load
triton already). The kernel tests fail, never skip, when the kernel is not what runs. Independent
references here are written from the specs in float64: a per-head loop
that materialises the softmax over the unmasked keys only, and each method's edit applied to those
probabilities step by step (var.md Step 2-3, gift.md Step 6, dual_stream.md section 3, vhr.md Step 2).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

from vlmfix.decoding.edits import FusionReweight, HeadScale, KeyBias, Transfer
from vlmfix.decoding.grouped import grouped_decode_output
from vlmfix.kernels import (
    GroupedDecodeResult,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    grouped_decode_attention_triton,
    grouped_decode_backend,
)
from vlmfix.kernels import grouped_decode as gd
from vlmfix.kernels._triton import HAS_TRITON

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNEL_BACKEND = "triton" if CUDA else "triton-interpret"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (the `kernels` extra) is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="fp16/bf16 kernel runs need a CUDA GPU")
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture
def kernel_backend():
    """Fails (never skips) a kernel test that would silently run the PyTorch reference instead."""
    backend = grouped_decode_backend(DEVICE)
    assert backend == KERNEL_BACKEND, (
        f"grouped_decode_attention runs {backend!r} on {DEVICE}, expected {KERNEL_BACKEND!r}: without a GPU "
        "set TRITON_INTERPRET=1 before triton is imported: TRITON_INTERPRET=1 python -m pytest ..."
    )
    return backend


# ---------------------------------------------------------------------------------------------------------
# inputs and independent references
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    kv_len: int
    head_dim: int
    groups: int
    left_pad: tuple[int, ...] = ()
    bias: bool = False
    gain: bool = False
    mult: bool = False


def make_inputs(case: Case, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape_kv = (case.batch, case.kv_heads, case.kv_len, case.head_dim)
    ids = torch.randint(0, case.groups, (case.batch, case.kv_len), generator=gen, dtype=torch.int32)
    key = 2 * torch.randn(shape_kv, generator=gen)
    for row, pad in enumerate(case.left_pad):
        ids[row, :pad] = -1
        key[row, :, :pad] *= 100  # padding holds large garbage logits: it must not even enter the running max
    inputs = {
        "query": torch.randn(case.batch, case.heads, case.head_dim, generator=gen).to(dtype),
        "key": key.to(dtype),
        "value": torch.randn(shape_kv, generator=gen).to(dtype),
        "group_ids": ids,
        "num_groups": case.groups,
        "scaling": case.head_dim**-0.5,
        "group_bias": (
            2 * torch.randn(case.batch, case.heads, case.groups, generator=gen) if case.bias else None
        ),
        "group_abs_gain": (
            torch.rand(case.batch, case.heads, case.groups, generator=gen) * 1.5 - 0.5 if case.gain else None
        ),
        "key_multiplier": 3 * torch.rand(case.batch, case.kv_len, generator=gen) if case.mult else None,
    }
    return {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}


def snapshot(inputs: dict) -> dict:
    return {name: t.clone() for name, t in inputs.items() if isinstance(t, torch.Tensor)}


def assert_unchanged(before: dict, inputs: dict) -> None:
    for name, saved in before.items():
        assert torch.equal(inputs[name], saved), f"{name} was modified in place"


def naive_probs(query, key, group_ids, scaling, group_bias=None, group_abs_gain=None) -> torch.Tensor:
    """P [batch, heads, kv_len] in float64: per (row, head), softmax over the unmasked keys only."""
    query, key, group_ids = query.double().cpu(), key.double().cpu(), group_ids.cpu()
    batch, heads, _ = query.shape
    heads_per_kv = heads // key.shape[1]
    probs = torch.zeros(batch, heads, key.shape[2], dtype=torch.float64)
    for b in range(batch):
        keep = (group_ids[b] >= 0).nonzero().flatten()
        if len(keep) == 0:
            continue
        groups = group_ids[b, keep].long()
        for h in range(heads):
            z = scaling * (key[b, h // heads_per_kv, keep] @ query[b, h])
            if group_abs_gain is not None:
                z = z + group_abs_gain[b, h, groups].double().cpu() * z.abs()
            if group_bias is not None:
                z = z + group_bias[b, h, groups].double().cpu()
            probs[b, h, keep] = torch.softmax(z, dim=0)
    return probs


def naive_grouped(inputs: dict) -> GroupedDecodeResult:
    """Group masses and value sums from the materialised probabilities, one group at a time."""
    probs = naive_probs(inputs["query"], inputs["key"], inputs["group_ids"], inputs["scaling"],
                        inputs["group_bias"], inputs["group_abs_gain"])
    value, ids = inputs["value"].double().cpu(), inputs["group_ids"].cpu()
    batch, heads, _ = probs.shape
    heads_per_kv = heads // value.shape[1]
    weightings = [probs]
    if inputs["key_multiplier"] is not None:
        weightings.append(probs * inputs["key_multiplier"].double().cpu()[:, None, :])
    sums = []
    for weights in weightings:
        mass = torch.zeros(batch, heads, inputs["num_groups"], dtype=torch.float64)
        value_sum = torch.zeros(batch, heads, inputs["num_groups"], value.shape[-1], dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                for g in range(inputs["num_groups"]):
                    in_group = ids[b] == g
                    mass[b, h, g] = weights[b, h, in_group].sum()
                    value_sum[b, h, g] = weights[b, h, in_group] @ value[b, h // heads_per_kv, in_group]
        sums += [mass, value_sum]
    return GroupedDecodeResult(*sums)


def assert_results_close(actual: GroupedDecodeResult, expected: GroupedDecodeResult, **tol) -> None:
    for field in ("mass", "value", "mult_mass", "mult_value"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert got.dtype == torch.float32, field
            torch.testing.assert_close(got.cpu().double(), want.cpu().double(), **tol, msg=field)


# ---------------------------------------------------------------------------------------------------------
# the reference against the materialised softmax
# ---------------------------------------------------------------------------------------------------------

REFERENCE_CASES = {
    "mha": Case(batch=2, heads=2, kv_heads=2, kv_len=11, head_dim=8, groups=3),
    "gqa_left_pad_all_rules": Case(batch=3, heads=4, kv_heads=2, kv_len=13, head_dim=16, groups=4,
                                   left_pad=(0, 2, 9), bias=True, gain=True, mult=True),
    "mqa_gain_then_bias": Case(batch=1, heads=3, kv_heads=1, kv_len=9, head_dim=4, groups=2,
                               bias=True, gain=True),
}


@pytest.mark.parametrize("case", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_reference_matches_materialised_softmax(case):
    inputs = make_inputs(case, seed=1)
    before = snapshot(inputs)
    assert_results_close(grouped_decode_attention_reference(**inputs), naive_grouped(inputs), **FP32_TOL)
    assert_unchanged(before, inputs)


@pytest.mark.parametrize("op", [grouped_decode_attention_reference, grouped_decode_attention],
                         ids=["reference", "public_op"])
def test_golden_values(op):
    # z = [0, ln 2, ln 3, (masked)] -> p = [1/6, 2/6, 3/6]; groups [0, 0, 1, -1]; v = [1, 2, 4, 100]
    # Triton's tl.dot needs head_dim >= 16: the used dimension is 0, the others are zero.
    key = torch.zeros(1, 1, 4, 16)
    key[0, 0, :, 0] = torch.tensor([0.0, math.log(2), math.log(3), 5.0])
    value = torch.zeros(1, 1, 4, 16)
    value[0, 0, :, 0] = torch.tensor([1.0, 2.0, 4.0, 100.0])
    query = torch.zeros(1, 1, 16)
    query[0, 0, 0] = 1.0
    ids = torch.tensor([[0, 0, 1, -1]], dtype=torch.int32)
    res = op(query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), ids.to(DEVICE), 2, 1.0)
    torch.testing.assert_close(res.mass.cpu(), torch.tensor([[[0.5, 0.5]]]))
    torch.testing.assert_close(res.value[0, 0, :, 0].cpu(), torch.tensor([5 / 6, 2.0]))

    # PAI rule on z = [1, -1], gains 0.5 (group 0), 0.25 (group 1): z' = [1.5, -0.75] -> p0 = 1/(1+e^-2.25)
    key2 = torch.zeros(1, 1, 2, 16)
    key2[0, 0, :, 0] = torch.tensor([1.0, -1.0])
    ids2 = torch.tensor([[0, 1]], dtype=torch.int32)
    gain = torch.tensor([[[0.5, 0.25]]])
    res = op(query.to(DEVICE), key2.to(DEVICE), key2.to(DEVICE), ids2.to(DEVICE), 2, 1.0,
             group_abs_gain=gain.to(DEVICE))
    torch.testing.assert_close(res.mass.cpu(), torch.tensor([[[0.904651, 0.095349]]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# the kernel against the reference
# ---------------------------------------------------------------------------------------------------------

KERNEL_CASES = {
    # kv_len 37: one partial key block; MHA; no pre-softmax rule
    "mha_odd_len_d64_g2": Case(batch=2, heads=2, kv_heads=2, kv_len=37, head_dim=64, groups=2),
    # GQA (2 query heads per kv head), left padding of 0, 7 and 30 keys, group bias
    "gqa_left_pad_d128_g3_bias": Case(batch=3, heads=4, kv_heads=2, kv_len=53, head_dim=128, groups=3,
                                      left_pad=(0, 7, 30), bias=True),
    # MQA, 6 groups, all three options; row 1 has a fully padded first key block (64 keys)
    "mqa_d64_g6_all_rules": Case(batch=2, heads=4, kv_heads=1, kv_len=101, head_dim=64, groups=6,
                                 left_pad=(0, 64), bias=True, gain=True, mult=True),
    # head_dim 128, gain only, kv_len one past two blocks
    "mha_d128_g4_gain": Case(batch=1, heads=2, kv_heads=2, kv_len=129, head_dim=128, groups=4, gain=True),
    # split-K (heuristic picks 2 splits) with GQA; the first split (384 keys) is entirely padding
    "split_gqa_d64_g5_all_rules": Case(batch=1, heads=4, kv_heads=2, kv_len=700, head_dim=64, groups=5,
                                       left_pad=(400,), bias=True, gain=True, mult=True),
    # split-K with head_dim 128, multiplier only, odd kv_len
    "split_mha_d128_g2_mult": Case(batch=2, heads=2, kv_heads=2, kv_len=531, head_dim=128, groups=2,
                                   left_pad=(0, 3), mult=True),
}
SPLIT_CASES = {"split_gqa_d64_g5_all_rules", "split_mha_d128_g2_mult"}


@needs_triton
@pytest.mark.parametrize("name", KERNEL_CASES.keys())
def test_kernel_matches_reference(name, kernel_backend):
    case = KERNEL_CASES[name]
    inputs = make_inputs(case)
    if name == "mqa_d64_g6_all_rules":
        inputs["group_bias"][:, 0, 1] = float("-inf")  # a group switched off (VAR's p = 1 in bias form)
    splits = gd.choose_num_splits(case.batch * case.heads, case.kv_len, gd._sm_count(torch.device(DEVICE)))
    if not CUDA:
        assert (splits > 1) == (name in SPLIT_CASES), splits
    before = snapshot(inputs)
    res = grouped_decode_attention(**inputs)
    assert_results_close(res, grouped_decode_attention_reference(**inputs), **FP32_TOL)
    torch.testing.assert_close(res.mass.sum(-1).cpu(), torch.ones(case.batch, case.heads))  # rows sum to 1
    assert_unchanged(before, inputs)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_kernel_forced_splits_match_reference(num_splits, kernel_backend):
    inputs = make_inputs(Case(batch=2, heads=2, kv_heads=1, kv_len=450, head_dim=64, groups=3,
                              left_pad=(0, 200), bias=True, mult=True), seed=3)
    before = snapshot(inputs)
    res = grouped_decode_attention_triton(**inputs, num_splits=num_splits)
    assert_results_close(res, grouped_decode_attention_reference(**inputs), **FP32_TOL)
    assert_unchanged(before, inputs)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3], ids=["single_split", "split_k"])
def test_fully_masked_row_gives_zeros(num_splits, kernel_backend):
    inputs = make_inputs(Case(batch=2, heads=2, kv_heads=2, kv_len=300, head_dim=64, groups=2,
                              left_pad=(0, 300), gain=True, mult=True), seed=4)
    res = grouped_decode_attention_triton(**inputs, num_splits=num_splits)
    for field in (res.mass, res.value, res.mult_mass, res.mult_value):
        assert not field.isnan().any()
        assert torch.equal(field[1], torch.zeros_like(field[1]))
    assert_results_close(res, grouped_decode_attention_reference(**inputs), **FP32_TOL)
    reference = grouped_decode_attention_reference(**inputs)
    assert torch.equal(reference.mass[1], torch.zeros_like(reference.mass[1]))


@needs_triton
@pytest.mark.parametrize("layout", ["cache_slice", "seq_major_transposed"])
def test_kernel_reads_non_contiguous_cache_views(layout, kernel_backend):
    batch, kv_heads, heads, kv_len, head_dim, max_len = 2, 2, 4, 77, 64, 96
    gen = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(DEVICE)

    if layout == "cache_slice":
        # a static cache [batch, kv_heads, max_len, head_dim] read up to kv_len; value with head-dim stride 2
        key = randn(batch, kv_heads, max_len, head_dim)[:, :, :kv_len]
        value = randn(batch, kv_heads, max_len, 2 * head_dim)[:, :, :kv_len, ::2]
    else:
        # a [batch, kv_len, kv_heads, head_dim] buffer viewed as [batch, kv_heads, kv_len, head_dim]
        key = randn(batch, kv_len, kv_heads, head_dim).transpose(1, 2)
        value = randn(batch, kv_len, kv_heads, head_dim).transpose(1, 2)
    query = randn(batch, 1, heads, head_dim)[:, 0]  # from [batch, q_len, heads, head_dim]
    ids = torch.randint(-1, 3, (batch, max_len), generator=gen, dtype=torch.int32).to(DEVICE)[:, :kv_len]
    assert not (key.is_contiguous() or value.is_contiguous() or ids.is_contiguous())
    inputs = {"query": query, "key": key, "value": value, "group_ids": ids, "num_groups": 3,
              "scaling": head_dim**-0.5, "group_bias": None, "group_abs_gain": None, "key_multiplier": None}
    before = snapshot(inputs)
    contiguous = {name: t.contiguous() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
    res = grouped_decode_attention(**inputs)
    assert_results_close(res, grouped_decode_attention_reference(**contiguous), **FP32_TOL)
    assert_unchanged(before, inputs)


@needs_cuda
@needs_triton
@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float32, 2e-5, 2e-5), (torch.float16, 5e-3, 5e-3), (torch.bfloat16, 3e-2, 3e-2)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("name", KERNEL_CASES.keys())
def test_kernel_low_precision_on_cuda(name, dtype, atol, rtol, kernel_backend):
    inputs = make_inputs(KERNEL_CASES[name], dtype=dtype, seed=6)
    before = snapshot(inputs)
    res = grouped_decode_attention(**inputs)
    assert_results_close(res, grouped_decode_attention_reference(**inputs), atol=atol, rtol=rtol)
    assert_unchanged(before, inputs)


def test_backend_choice(monkeypatch, kernel_backend):
    interpreted = gd.is_interpreted(gd._grouped_decode_kernel)
    assert grouped_decode_backend("cuda") == ("triton-interpret" if interpreted else "triton")
    assert grouped_decode_backend("cpu") == ("triton-interpret" if interpreted else "reference")
    monkeypatch.setattr(gd, "matches_triton_mode", lambda kernel: False)  # kernel and triton built apart
    assert grouped_decode_backend("cuda") == "reference"
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET changed between importing triton"):
        grouped_decode_attention_triton(**make_inputs(KERNEL_CASES["mha_odd_len_d64_g2"]))
    monkeypatch.setattr(gd, "HAS_TRITON", False)
    assert grouped_decode_backend("cuda") == "reference"


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "query_with_q_len_axis": (lambda i: {**i, "query": i["query"][:, :, None]}, r"query.*query\[:, :, 0\]"),
    "heads_not_multiple": (
        lambda i: {**i, "query": i["query"][:, :3]}, r"\(3\) must be a multiple of kv_heads"
    ),
    "too_many_groups": (lambda i: {**i, "num_groups": 9}, r"`num_groups` must be an int in \[1, 8\], got 9"),
    "group_id_out_of_range": (
        lambda i: {**i, "group_ids": i["group_ids"].clone().fill_(3)},
        r"`group_ids` must lie in \[-1, num_groups\) = \[-1, 3\), got values in \[3, 3\]",
    ),
    "group_ids_float": (lambda i: {**i, "group_ids": i["group_ids"].float()}, r"`group_ids` must be int32"),
    "bias_shape": (
        lambda i: {**i, "group_bias": torch.zeros(2, 4, 2)}, r"`group_bias` must have shape \(2, 4, 3\)"
    ),
    "multiplier_dtype": (
        lambda i: {**i, "key_multiplier": torch.ones(2, 20, dtype=torch.float16)},
        r"`key_multiplier` must be float32",
    ),
    "dtype_mismatch": (lambda i: {**i, "key": i["key"].half()}, r"must share one dtype"),
    "value_shape": (lambda i: {**i, "value": i["value"][:, :, :5]}, r"`value` must have the shape of `key`"),
}


@pytest.mark.parametrize("op", [grouped_decode_attention_reference, grouped_decode_attention],
                         ids=["reference", "public_op"])
@pytest.mark.parametrize("name", BAD_INPUTS.keys())
def test_bad_input_is_named(op, name):
    mutate, message = BAD_INPUTS[name]
    case = Case(batch=2, heads=4, kv_heads=2, kv_len=20, head_dim=16, groups=3)
    inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in make_inputs(case).items()}
    with pytest.raises((ValueError, TypeError), match=message):
        op(**mutate(inputs))


@needs_triton
def test_launcher_rejects_bad_splits_and_cpu_tensors_without_interpreter(monkeypatch):
    inputs = make_inputs(Case(batch=1, heads=2, kv_heads=2, kv_len=20, head_dim=16, groups=2))
    with pytest.raises(ValueError, match=r"`num_splits` must be a positive int or None, got 0"):
        grouped_decode_attention_triton(**inputs, num_splits=0)
    monkeypatch.setattr(gd, "is_interpreted", lambda kernel: False)  # as if compiled for a GPU
    cpu_inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"on the CPU with TRITON_INTERPRET=1 set before triton is imported"):
        grouped_decode_attention_triton(**cpu_inputs)


# ---------------------------------------------------------------------------------------------------------
# the library's edited decode step against the probability-level edits of the specs
# ---------------------------------------------------------------------------------------------------------

REST, TEXT_SINK, VIS_SINK, VIS_NONSINK = 0, 1, 2, 3


def structured_inputs(preferences: list[list[float]], ids: torch.Tensor, *, kv_heads: int, seed: int) -> dict:
    """Keys point along their group's axis; query head h weighs group g by preferences[h][g]."""
    gen = torch.Generator().manual_seed(seed)
    batch, kv_len = ids.shape
    heads, head_dim = len(preferences), 64
    axis = torch.eye(head_dim)[: len(preferences[0])]  # [groups, head_dim]
    key = 0.3 * torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    key = key + 3 * axis[ids.long().clamp(min=0)][:, None]
    query = torch.tensor(preferences, dtype=torch.float32) @ axis
    query = query + 0.3 * torch.randn(batch, heads, head_dim, generator=gen)
    value = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    inputs = {"query": query, "key": key, "value": value,
              "group_ids": ids.to(torch.int32), "num_groups": len(preferences[0]), "scaling": head_dim**-0.5}
    return {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}


def edit_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """out [batch, heads, head_dim] = P' @ V (float64), GQA by repeating kv heads."""
    value = value.double().cpu().repeat_interleave(probs.shape[1] // value.shape[1], dim=1)
    return torch.einsum("bhk,bhkd->bhd", probs, value)


def library_output(inputs: dict, edits: list) -> torch.Tensor:
    """`grouped_decode_output` (what an edited decode step runs) on these inputs: [batch, heads, head_dim]."""
    padding = (inputs["group_ids"] >= 0).long()  # [batch, kv_len]
    out = grouped_decode_output(inputs["query"][:, :, None], inputs["key"], inputs["value"], padding,
                                inputs["scaling"], edits)
    assert out is not None, "grouped_decode_output declined edits it should serve"
    return out[:, 0]


def var_edit(ids: torch.Tensor, *, p: float, summ: float, rho: float) -> Transfer:
    image = (ids == VIS_SINK) | (ids == VIS_NONSINK)
    sinks = (ids == VIS_SINK) | (ids == TEXT_SINK)
    return Transfer(source=sinks.to(DEVICE), receivers=(image & ~sinks).to(DEVICE), gate_keys=image.to(DEVICE),
                    fraction=p, min_gate_mass=summ, min_receiver_share=rho, require_gate_source=True)


def var_ids() -> torch.Tensor:
    # row 0: all groups; row 1: left padding; row 2: no visual sink at all (never edited, D6)
    ids = torch.tensor([REST, TEXT_SINK, REST] + [VIS_SINK, VIS_NONSINK, VIS_NONSINK] * 10 + [REST] * 7)
    ids = ids.repeat(3, 1)
    ids[1, :5] = -1
    ids[2][ids[2] == VIS_SINK] = VIS_NONSINK
    return ids


# per head: weights of (rest, text sink, visual sink, visual non-sink) in the query
VAR_PREFERENCES = [[0, 0, 0, 24], [0, 0, 24, 4], [24, 0, 0, 0], [0, 12, 14, 16]]


def var_explicit(inputs: dict, *, p: float, summ: float, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """var.md Step 2-3 on materialised probabilities. Returns (out [batch, heads, head_dim],
    selected [batch, heads])."""
    probs = naive_probs(inputs["query"], inputs["key"], inputs["group_ids"], inputs["scaling"])
    ids = inputs["group_ids"].cpu()
    edited = probs.clone()
    selected = torch.zeros(probs.shape[:2], dtype=torch.bool)
    for b in range(probs.shape[0]):
        image = (ids[b] == VIS_SINK) | (ids[b] == VIS_NONSINK)
        vis_sinks, text_sinks = ids[b] == VIS_SINK, ids[b] == TEXT_SINK
        sinks = vis_sinks | text_sinks
        nonsink_image = image & ~vis_sinks
        for h in range(probs.shape[1]):
            row = probs[b, h]
            m_vis, m_vs, m_ts = row[image].sum(), row[vis_sinks].sum(), row[text_sinks].sum()
            m_vn = m_vis - m_vs
            r = m_vn / m_vis if m_vis > 0 else 0.0
            if m_vis >= summ and r >= rho and vis_sinks.any():
                selected[b, h] = True
                omega = p * (m_vs + m_ts)
                edited[b, h, sinks] = (1 - p) * row[sinks]
                edited[b, h, nonsink_image] = row[nonsink_image] * (1 + omega / m_vn)
    return edit_output(edited, inputs["value"]), selected


@pytest.mark.parametrize("p", [0.6, 1.0])
def test_var_decode_step_matches_probability_edit(p):
    inputs = structured_inputs(VAR_PREFERENCES, var_ids(), kv_heads=2, seed=7)
    before = snapshot(inputs)
    expected, selected = var_explicit(inputs, p=p, summ=0.2, rho=0.5)
    assert selected.any() and not selected.all()  # edited and unedited heads
    assert not selected[2].any()  # the row without visual sinks
    out = library_output(inputs, [var_edit(var_ids(), p=p, summ=0.2, rho=0.5)])
    torch.testing.assert_close(out.cpu().double(), expected, **FP32_TOL)
    assert_unchanged(before, inputs)


def test_var_with_p_zero_is_plain_attention():
    inputs = structured_inputs(VAR_PREFERENCES, var_ids(), kv_heads=2, seed=8)
    out = library_output(inputs, [var_edit(var_ids(), p=0.0, summ=0.2, rho=0.5)])
    plain = edit_output(naive_probs(inputs["query"], inputs["key"], inputs["group_ids"], inputs["scaling"]),
                        inputs["value"])
    torch.testing.assert_close(out.cpu().double(), plain, **FP32_TOL)


GIFT_REST, GIFT_IMAGE, GIFT_QUERY = 0, 1, 2
GIFT_PREFERENCES = [[0, 20, 0], [0, 6, 14], [10, 8, 0], [0, 0, 20], [12, 4, 6], [0, 12, 10]]


def gift_ids() -> torch.Tensor:
    layout = [GIFT_REST] * 3 + [GIFT_IMAGE] * 24 + [GIFT_REST] * 2 + [GIFT_QUERY] * 6 + [GIFT_REST] * 4
    ids = torch.tensor(layout)
    ids = ids.repeat(2, 1)
    ids[1, :6] = -1
    return ids


def gift_explicit(inputs: dict, multiplier: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, ...]:
    """gift.md Step 6, items 1-8, on materialised probabilities. Returns (out, edited heads)."""
    probs = naive_probs(inputs["query"], inputs["key"], inputs["group_ids"], inputs["scaling"])
    ids, multiplier = inputs["group_ids"].cpu(), multiplier.double().cpu()
    heads = probs.shape[1]
    edited = probs.clone()
    edited_heads = torch.zeros(probs.shape[:2], dtype=torch.bool)
    for b in range(probs.shape[0]):
        image, query = ids[b] == GIFT_IMAGE, ids[b] == GIFT_QUERY
        vis, qry = probs[b][:, image], probs[b][:, query]  # [heads, N_v], [heads, N_q]
        visual_heads = vis.sum(1).topk(heads // 2).indices
        o = vis[visual_heads].sum()
        e = (vis[visual_heads] * multiplier[b, image]).sum()
        r = e / o if o > 0 else 1.0
        query_heads = qry.sum(1).topk(heads // 2).indices
        for h in visual_heads:
            edited[b, h, image] = probs[b, h, image] * multiplier[b, image]
        for h in query_heads:
            edited[b, h, query] = beta * r * probs[b, h, query]
        for h in set(visual_heads.tolist()) | set(query_heads.tolist()):
            edited[b, h] = edited[b, h] / edited[b, h].sum()
            edited_heads[b, h] = True
    return edit_output(edited, inputs["value"]), edited_heads


def gift_multiplier(ids: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    saliency = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed))  # S_hat in [0, 1]
    return torch.where(ids == GIFT_IMAGE, torch.exp(alpha * saliency), 1.0).to(DEVICE)


def gift_edit(ids: torch.Tensor, multiplier: torch.Tensor, beta: float) -> FusionReweight:
    return FusionReweight(image=(ids == GIFT_IMAGE).to(DEVICE), multiplier=multiplier,
                          query=(ids == GIFT_QUERY).to(DEVICE), beta=beta, head_fraction=0.5)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gift_decode_step_matches_probability_edit(beta):
    inputs = structured_inputs(GIFT_PREFERENCES, gift_ids(), kv_heads=3, seed=9)
    multiplier = gift_multiplier(gift_ids(), alpha=5.0, seed=10)
    before = snapshot({**inputs, "key_multiplier": multiplier})
    expected, edited_heads = gift_explicit(inputs, multiplier, beta=beta)
    assert edited_heads.any() and not edited_heads.all()
    out = library_output(inputs, [gift_edit(gift_ids(), multiplier, beta)])
    torch.testing.assert_close(out.cpu().double(), expected, **FP32_TOL)
    assert_unchanged(before, {**inputs, "key_multiplier": multiplier})


def test_gift_with_unit_multiplier_is_plain_attention():
    inputs = structured_inputs(GIFT_PREFERENCES, gift_ids(), kv_heads=3, seed=11)
    out = library_output(inputs, [gift_edit(gift_ids(), gift_multiplier(gift_ids(), alpha=0.0, seed=12), 1.0)])
    plain = edit_output(naive_probs(inputs["query"], inputs["key"], inputs["group_ids"], inputs["scaling"]),
                        inputs["value"])
    torch.testing.assert_close(out.cpu().double(), plain, **FP32_TOL)


def test_pai_and_dual_stream_boost_matches_logit_edit():
    # dual-stream: local image tokens get alpha = 0.7, summary tokens beta = 0.4; PAI is the one-group case
    rest, local, summary = 0, 1, 2
    ids = torch.tensor([rest] * 4 + [local] * 20 + [summary] * 3 + [rest] * 6).repeat(2, 1)
    ids[0, :2] = -1
    inputs = structured_inputs([[4, 6, 2], [0, 3, 3], [5, 0, 0]], ids, kv_heads=1, seed=13)
    margin_of_key = torch.tensor([0.0, 0.7, 0.4])[ids.long().clamp(min=0)]  # [batch, kv_len]
    out = library_output(inputs, [KeyBias(abs_gain=margin_of_key[:, None].to(DEVICE))])

    # dual_stream.md section 3: z = QK^T/sqrt(d); z[j] += m_j * |z[j]| on the boosted columns; softmax; @ V
    query, key = inputs["query"].double().cpu(), inputs["key"].double().cpu()
    z = inputs["scaling"] * torch.einsum("bhd,bkd->bhk", query, key[:, 0])
    margin = torch.tensor([0.0, 0.7, 0.4], dtype=torch.float64)[ids.long().clamp(min=0)][:, None, :]
    z = (z + margin * z.abs()).masked_fill((ids < 0)[:, None, :], float("-inf"))
    expected = edit_output(torch.softmax(z, dim=-1), inputs["value"])
    torch.testing.assert_close(out.cpu().double(), expected, **FP32_TOL)


def test_vhr_head_scale_matches_scaled_head_outputs():
    inputs = structured_inputs(VAR_PREFERENCES, var_ids(), kv_heads=2, seed=14)
    scale = torch.where(torch.tensor([[True, False, True, False]] * 3), 2.0, 1.0).to(DEVICE)  # alpha = 2
    out = library_output(inputs, [HeadScale(scale=scale)])
    head_outputs = edit_output(naive_probs(inputs["query"], inputs["key"], inputs["group_ids"],
                                           inputs["scaling"]), inputs["value"])  # A_{l,i}: [batch, heads, d]
    expected = head_outputs * scale.double().cpu()[..., None]
    torch.testing.assert_close(out.cpu().double(), expected, **FP32_TOL)


def test_kernel_benchmark_providers_compute_the_same_step():
    """benchmarks/kernels.py times four paths of one decode step; they must compute the same thing
    (the kernel alone and SDPA: plain attention; the library's grouped path and the PyTorch edit path: VAR)."""
    from benchmarks import kernels as bench

    inputs = bench.make_inputs(heads=4, kv_heads=2, kv_len=700, dtype=torch.float32, device=DEVICE)
    plain = bench.run_sdpa(**inputs)[:, :, 0]  # [batch, heads, head_dim]
    torch.testing.assert_close(bench.run_kernel(**inputs), plain, **FP32_TOL)
    edited = bench.run_materialised(**inputs)[:, 0]
    assert not torch.allclose(edited, plain, **FP32_TOL)  # the edit selects heads here: it changes the step
    torch.testing.assert_close(bench.run_kernel_var(**inputs)[:, 0], edited, **FP32_TOL)
