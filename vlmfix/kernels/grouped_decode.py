"""Grouped decode attention: per-head softmax mass and value sum of each key group, in one pass over the keys.

At a decode step (one query token) every post-softmax method in vlmfix reweights a few groups of keys per
head (VAR: sinks / visual non-sinks / rest; GIFT: image / query / rest). This op computes, per (row, head)
and per key group g, the unmodified softmax mass and weighted value sum

    mass[g]  = sum_{j in g} p_j             value[g] = sum_{j in g} p_j v_j            p = softmax(z)

(optionally also with p_j * multiplier_j), so that each method's edit becomes a tiny closed form over
[batch, heads, groups, head_dim] (`vlmfix.decoding.grouped` applies the edit vocabulary there).
Pre-softmax rules act on the logits:
z_j = scaling * q.k_j, then z_j += gain[g(j)] * |z_j| (PAI), then z_j += bias[g(j)].

The module reads top-down: the PyTorch reference, the Triton kernels, the launcher, the public op.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmfix.kernels._triton import HAS_TRITON, is_interpreted, matches_triton_mode, tl, triton

MAX_GROUPS = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GROUP_ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class GroupedDecodeResult:
    """Per-head, per-group softmax masses and value sums of one decode step, all fp32.

    Attributes:
        mass: [batch, heads, groups]; sum over the group's keys of p_j (p = softmax over all unmasked
            keys, so the masses of a head sum to 1, or are all 0 when every key is masked).
        value: [batch, heads, groups, head_dim]; sum over the group's keys of p_j * v_j.
        mult_mass: like `mass` with p_j * multiplier_j, or None when no `key_multiplier` was given.
        mult_value: like `value` with p_j * multiplier_j, or None when no `key_multiplier` was given.
    """

    mass: Tensor
    value: Tensor
    mult_mass: Tensor | None = None
    mult_value: Tensor | None = None


@dataclass(frozen=True)
class _Dims:
    batch: int
    heads: int
    kv_heads: int
    kv_len: int
    head_dim: int


def _validate(
    op: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group_ids: Tensor,
    num_groups: int,
    scaling: float,
    group_bias: Tensor | None,
    group_abs_gain: Tensor | None,
    key_multiplier: Tensor | None,
) -> _Dims:
    """Check shapes, dtypes and devices (and, for CPU tensors, group id values); return the dimensions.

    Value checks on CUDA tensors would force a host-device sync at every decode step, so they run only on
    the CPU; on CUDA, group ids outside [0, num_groups) are treated as masked keys.
    """
    if query.dim() != 3:
        hint = " For a [batch, heads, 1, head_dim] query pass query[:, :, 0]." if query.dim() == 4 else ""
        raise ValueError(
            f"{op}: `query` must be [batch, heads, head_dim] (one decode token), got shape "
            f"{tuple(query.shape)}.{hint}"
        )
    if key.dim() != 4:
        raise ValueError(
            f"{op}: `key` must be [batch, kv_heads, kv_len, head_dim], got shape {tuple(key.shape)}."
        )
    if value.shape != key.shape:
        raise ValueError(
            f"{op}: `value` must have the shape of `key` {tuple(key.shape)}, got {tuple(value.shape)}."
        )
    batch, heads, head_dim = query.shape
    _, kv_heads, kv_len, key_dim = key.shape
    if key.shape[0] != batch or key_dim != head_dim:
        raise ValueError(
            f"{op}: `key` {tuple(key.shape)} does not match `query` {tuple(query.shape)}: batch and "
            "head_dim must agree."
        )
    if kv_len < 1:
        raise ValueError(f"{op}: `key` has kv_len 0; a decode step needs at least one key.")
    if heads % kv_heads != 0:
        raise ValueError(
            f"{op}: query heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for grouped-query "
            "attention; pass the key/value states of the same layer as the query."
        )
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: `query` dtype must be float32, float16 or bfloat16, got {query.dtype}.")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"{op}: `query`, `key` and `value` must share one dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}; cast them to the model's dtype."
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"{op}: `num_groups` must be an int in [1, {MAX_GROUPS}], got {num_groups!r}.")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: `scaling` must be a finite float (usually head_dim**-0.5), got {scaling!r}.")
    if group_ids.shape != (batch, kv_len):
        raise ValueError(
            f"{op}: `group_ids` must be [batch, kv_len] = {(batch, kv_len)}, got {tuple(group_ids.shape)}."
        )
    if group_ids.dtype not in _GROUP_ID_DTYPES:
        raise TypeError(
            f"{op}: `group_ids` must be int32 (or int64), got {group_ids.dtype}; use "
            "group_ids.to(torch.int32)."
        )
    for name, tensor, shape in (
        ("group_bias", group_bias, (batch, heads, num_groups)),
        ("group_abs_gain", group_abs_gain, (batch, heads, num_groups)),
        ("key_multiplier", key_multiplier, (batch, kv_len)),
    ):
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: `{name}` must have shape {shape}, got {tuple(tensor.shape)}.")
        if tensor.dtype != torch.float32:
            raise TypeError(f"{op}: `{name}` must be float32, got {tensor.dtype}; use .float().")
    named = {"query": query, "key": key, "value": value, "group_ids": group_ids, "group_bias": group_bias,
             "group_abs_gain": group_abs_gain, "key_multiplier": key_multiplier}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != query.device:
            raise ValueError(
                f"{op}: `{name}` is on {tensor.device} but `query` is on {query.device}; move all inputs "
                "to one device."
            )
    if query.device.type != "cuda":
        low, high = int(group_ids.min()), int(group_ids.max())
        if low < -1 or high >= num_groups:
            raise ValueError(
                f"{op}: `group_ids` must lie in [-1, num_groups) = [-1, {num_groups}), got values in "
                f"[{low}, {high}]; use -1 for masked keys, or raise num_groups."
            )
    return _Dims(batch=batch, heads=heads, kv_heads=kv_heads, kv_len=kv_len, head_dim=head_dim)


# ----------------------------------------------------------------------------------------------------------
# 1. Reference (plain PyTorch, fp32)
# ----------------------------------------------------------------------------------------------------------


def grouped_decode_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group_ids: Tensor,
    num_groups: int,
    scaling: float,
    group_bias: Tensor | None = None,
    group_abs_gain: Tensor | None = None,
    key_multiplier: Tensor | None = None,
) -> GroupedDecodeResult:
    """Plain-PyTorch grouped decode attention; same contract as `grouped_decode_attention`."""
    dims = _validate(
        "grouped_decode_attention_reference", query, key, value, group_ids, num_groups, scaling,
        group_bias, group_abs_gain, key_multiplier,
    )
    heads_per_kv = dims.heads // dims.kv_heads
    # k, v: [batch, heads, kv_len, head_dim] (query head h reads kv head h // heads_per_kv)
    k = key.float().repeat_interleave(heads_per_kv, dim=1)
    v = value.float().repeat_interleave(heads_per_kv, dim=1)
    valid = group_ids >= 0  # [batch, kv_len]
    group_of_key = group_ids.long().clamp(min=0)  # [batch, kv_len]
    one_hot = torch.nn.functional.one_hot(group_of_key, num_groups).float() * valid[..., None]
    # z: [batch, heads, kv_len]
    z = scaling * torch.einsum("bhd,bhkd->bhk", query.float(), k)
    per_key_index = group_of_key[:, None, :].expand(-1, dims.heads, -1)  # [batch, heads, kv_len]
    if group_abs_gain is not None:
        z = z + torch.gather(group_abs_gain, 2, per_key_index) * z.abs()
    if group_bias is not None:
        z = z + torch.gather(group_bias, 2, per_key_index)
    z = z.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(z, dim=-1)
    p = torch.where(torch.isneginf(z).all(dim=-1, keepdim=True), 0.0, p)  # all keys masked: mass 0
    mass = torch.einsum("bhk,bkg->bhg", p, one_hot)
    value_sum = torch.einsum("bhk,bkg,bhkd->bhgd", p, one_hot, v)
    if key_multiplier is None:
        return GroupedDecodeResult(mass=mass, value=value_sum)
    p_mult = p * key_multiplier[:, None, :]
    return GroupedDecodeResult(
        mass=mass,
        value=value_sum,
        mult_mass=torch.einsum("bhk,bkg->bhg", p_mult, one_hot),
        mult_value=torch.einsum("bhk,bkg,bhkd->bhgd", p_mult, one_hot, v),
    )


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------------------
#
# One program per (row, query head, split of the keys). It keeps one running max m (shared by all groups)
# and a [ROWS, head_dim] accumulator whose rows are the groups: rows 0..GROUP_PAD-1 hold sum exp(z_j - m)
# [* v_j] of each group, rows GROUP_PAD..2*GROUP_PAD-1 the same times multiplier_j. Each key block builds
# the weight matrix W[row, j] = exp(z_j - m) * [g(j) == row % GROUP_PAD] * (multiplier_j on mult rows),
# so the value update is one matrix product W @ V (16 rows: the smallest tl.dot). When the max grows, all
# rows are rescaled by exp(m_old - m_new). The softmax normaliser is the sum of the plain rows, because
# every unmasked key is in exactly one group. With several splits, the reduce kernel merges the partial
# rows with a log-sum-exp: M = max_s m_s, rows = sum_s exp(m_s - M) * rows_s.
#
# Closed forms applied to these sums (vlmfix.decoding.grouped; specs var.md, gift.md):
#   VAR, on a selected head:  out = (1 - p) * (o_vs + o_ts) + (1 + Omega / m_vn) * o_vn + o_rest,
#                             Omega = p * (m_vs + m_ts)
#   GIFT, on an edited head:  out = (sum_g o'_g) / (sum_g m'_g), with o'_img = mult_value[img] on visual
#                             heads and o'_qry = beta * r * value[qry] on query heads,
#                             r = sum_{visual heads} mult_mass[img] / sum_{visual heads} mass[img]


@triton.jit
def _write_normalised(
    row_sum, acc, row_is_mult, group_ok, row_group, bh, num_groups, offs_d, d_mask,
    Mass_ptr, Value_ptr, MultMass_ptr, MultValue_ptr, HEAD_DIM: tl.constexpr, HAS_MULT: tl.constexpr,
):
    """Normalise the group sums by the plain total mass and write them (both kernels' epilogue)."""
    total = tl.sum(tl.where(row_is_mult, 0.0, row_sum), axis=0)
    inv_total = tl.where(total > 0.0, 1.0 / tl.maximum(total, 1e-30), 0.0)  # total is 0 or >= 1
    out_row = bh * num_groups + row_group  # [ROWS]
    out_offs = out_row[:, None] * HEAD_DIM + offs_d[None, :]  # [ROWS, BLOCK_D]
    plain = group_ok & ~row_is_mult
    tl.store(Mass_ptr + out_row, row_sum * inv_total, mask=plain)
    tl.store(Value_ptr + out_offs, acc * inv_total, mask=plain[:, None] & d_mask[None, :])
    if HAS_MULT:
        multiplied = group_ok & row_is_mult
        tl.store(MultMass_ptr + out_row, row_sum * inv_total, mask=multiplied)
        tl.store(MultValue_ptr + out_offs, acc * inv_total, mask=multiplied[:, None] & d_mask[None, :])


@triton.jit
def _grouped_decode_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qd,
    K_ptr, stride_kb, stride_kh, stride_kn, stride_kd,
    V_ptr, stride_vb, stride_vh, stride_vn, stride_vd,
    Gid_ptr, stride_gidb, stride_gidn,
    Bias_ptr, stride_biasb, stride_biash, stride_biasg,
    Gain_ptr, stride_gainb, stride_gainh, stride_gaing,
    Mult_ptr, stride_multb, stride_multn,
    PartMax_ptr, PartRows_ptr, PartAcc_ptr,
    Mass_ptr, Value_ptr, MultMass_ptr, MultValue_ptr,
    heads, heads_per_kv, kv_len, num_groups, num_splits, keys_per_split, scaling,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MULT: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 keys per block")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs a head-dim block of at least 16")
    tl.static_assert(2 * GROUP_PAD >= 16, "tl.dot needs at least 16 accumulator rows")
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    kv_h = h // heads_per_kv

    rows = tl.arange(0, 2 * GROUP_PAD)
    row_group = rows % GROUP_PAD
    row_is_mult = rows >= GROUP_PAD
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # all true (and dropped by the compiler) when HEAD_DIM is a power of 2
    # q: [BLOCK_D]
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32)

    m_i = -float("inf")
    row_sum = tl.zeros([2 * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([2 * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    split_start = split * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, kv_len)
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < split_end
        gid = tl.load(Gid_ptr + b * stride_gidb + offs_n * stride_gidn, mask=n_mask, other=-1)
        valid = n_mask & (gid >= 0) & (gid < num_groups)
        gid = tl.where(valid, gid, 0)
        kv_mask = valid[:, None] & d_mask[None, :]
        # k: [BLOCK_N, BLOCK_D]; masked keys are never read
        k = tl.load(
            K_ptr + b * stride_kb + kv_h * stride_kh
            + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        )
        z = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scaling  # [BLOCK_N]
        if HAS_GAIN:
            gain = tl.load(Gain_ptr + b * stride_gainb + h * stride_gainh + gid * stride_gaing, mask=valid,
                           other=0.0)
            z = z + gain * tl.abs(z)
        if HAS_BIAS:
            bias = tl.load(Bias_ptr + b * stride_biasb + h * stride_biash + gid * stride_biasg, mask=valid,
                           other=0.0)
            z = z + bias
        z = tl.where(valid, z, -float("inf"))

        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no key yet: avoid (-inf) - (-inf)
        rescale = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe)  # [BLOCK_N]; 0 on masked keys
        if HAS_MULT:
            mult = tl.load(Mult_ptr + b * stride_multb + offs_n * stride_multn, mask=valid, other=0.0)
            key_weight = tl.where(row_is_mult[:, None], mult[None, :], 1.0)  # [ROWS, BLOCK_N]
        else:
            key_weight = tl.where(row_is_mult, 0.0, 1.0)[:, None]  # [ROWS, 1]
        in_group = row_group[:, None] == gid[None, :]  # [ROWS, BLOCK_N]
        w = tl.where(in_group, p[None, :] * key_weight, 0.0)  # [ROWS, BLOCK_N]
        # v: [BLOCK_N, BLOCK_D]
        v = tl.load(
            V_ptr + b * stride_vb + kv_h * stride_vh
            + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        )
        row_sum = row_sum * rescale + tl.sum(w, axis=1)
        acc = tl.dot(w.to(v.dtype), v, acc * rescale, input_precision=INPUT_PRECISION)
        m_i = m_new

    group_ok = row_group < num_groups
    if SINGLE_SPLIT:
        _write_normalised(
            row_sum, acc, row_is_mult, group_ok, row_group, bh, num_groups, offs_d, d_mask,
        Mass_ptr, Value_ptr, MultMass_ptr, MultValue_ptr, HEAD_DIM, HAS_MULT,
        )
    else:
        # partials: max [bh, split], rows [bh, split, ROWS], acc [bh, split, ROWS, head_dim]
        part = bh * num_splits + split
        if HAS_MULT:
            kept = group_ok
        else:
            kept = group_ok & ~row_is_mult
        tl.store(PartMax_ptr + part, m_i)
        tl.store(PartRows_ptr + part * 2 * GROUP_PAD + rows, row_sum, mask=kept)
        part_offs = (part * 2 * GROUP_PAD + rows[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(PartAcc_ptr + part_offs, acc, mask=kept[:, None] & d_mask[None, :])


@triton.jit
def _grouped_decode_reduce_kernel(
    PartMax_ptr, PartRows_ptr, PartAcc_ptr,
    Mass_ptr, Value_ptr, MultMass_ptr, MultValue_ptr,
    num_groups, num_splits,
    HEAD_DIM: tl.constexpr, HAS_MULT: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, 2 * GROUP_PAD)
    row_group = rows % GROUP_PAD
    row_is_mult = rows >= GROUP_PAD
    group_ok = row_group < num_groups
    if HAS_MULT:
        kept = group_ok
    else:
        kept = group_ok & ~row_is_mult
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits

    # split_max: [BLOCK_S]; log-sum-exp merge against the shared max
    split_max = tl.load(PartMax_ptr + bh * num_splits + offs_s, mask=s_mask, other=-float("inf"))
    m = tl.max(split_max, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    split_scale = tl.exp(split_max - m_safe)  # [BLOCK_S]
    # split_rows: [BLOCK_S, ROWS]
    split_rows = tl.load(
        PartRows_ptr + (bh * num_splits + offs_s[:, None]) * 2 * GROUP_PAD + rows[None, :],
        mask=s_mask[:, None] & kept[None, :], other=0.0,
    )
    row_sum = tl.sum(split_rows * split_scale[:, None], axis=0)  # [ROWS]
    acc = tl.zeros([2 * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        part = bh * num_splits + s
        scale = tl.exp(tl.load(PartMax_ptr + part) - m_safe)
        part_offs = (part * 2 * GROUP_PAD + rows[:, None]) * HEAD_DIM + offs_d[None, :]
        acc += scale * tl.load(PartAcc_ptr + part_offs, mask=kept[:, None] & d_mask[None, :], other=0.0)

    _write_normalised(
        row_sum, acc, row_is_mult, group_ok, row_group, bh, num_groups, offs_d, d_mask,
        Mass_ptr, Value_ptr, MultMass_ptr, MultValue_ptr, HEAD_DIM, HAS_MULT,
    )


# ----------------------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------------------

_BLOCK_N = 64
_NUM_WARPS = 4
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 2
_INTERPRETER_SM_COUNT = 4  # the CPU interpreter has no SMs; small, so long contexts still split in tests


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch_heads: int, kv_len: int, sm_count: int) -> int:
    """Split-K count: enough programs to fill the GPU, with at least `_MIN_KEYS_PER_SPLIT` keys each."""
    wanted = math.ceil(_PROGRAMS_PER_SM * sm_count / batch_heads)
    return max(1, min(wanted, _MAX_SPLITS, math.ceil(kv_len / _MIN_KEYS_PER_SPLIT)))


def grouped_decode_attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group_ids: Tensor,
    num_groups: int,
    scaling: float,
    group_bias: Tensor | None = None,
    group_abs_gain: Tensor | None = None,
    key_multiplier: Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> GroupedDecodeResult:
    """Run the Triton kernel: compiled on CUDA, or interpreted (any device) when `TRITON_INTERPRET=1` was
    set before triton was imported.

    Same contract as `grouped_decode_attention`. `num_splits` forces the split-K count (None: chosen from
    the GPU's SM count, the heads and kv_len); it is rounded down so that no split is empty.
    """
    op = "grouped_decode_attention_triton"
    if not HAS_TRITON:
        raise ImportError(f"{op} needs triton: pip install 'vlmfix[kernels]'.")
    if not matches_triton_mode(_grouped_decode_kernel):
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET changed between importing triton and importing vlmfix.kernels, so the "
            "kernel and triton's library were built for different modes. Set TRITON_INTERPRET=1 (or unset "
            "it) before anything imports triton, e.g. in the environment of the python process."
        )
    dims = _validate(op, query, key, value, group_ids, num_groups, scaling, group_bias, group_abs_gain,
                     key_multiplier)
    interpret = is_interpreted(_grouped_decode_kernel)
    if query.device.type != "cuda" and not interpret:
        raise ValueError(
            f"{op}: tensors are on {query.device}; the Triton kernel runs on CUDA, or on the CPU with "
            "TRITON_INTERPRET=1 set before triton is imported. Use grouped_decode_attention, which falls "
            "back to the PyTorch reference."
        )
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"{op}: `num_splits` must be a positive int or None, got {num_splits!r}.")

    batch_heads = dims.batch * dims.heads
    if num_splits is None:
        num_splits = choose_num_splits(batch_heads, dims.kv_len, _sm_count(query.device))
    keys_per_split = _BLOCK_N * math.ceil(math.ceil(dims.kv_len / num_splits) / _BLOCK_N)
    num_splits = math.ceil(dims.kv_len / keys_per_split)  # no empty split
    rows = 2 * MAX_GROUPS
    f32: dict[str, Any] = {"device": query.device, "dtype": torch.float32}

    # outputs: mass [batch, heads, groups], value [batch, heads, groups, head_dim]
    mass = torch.empty(dims.batch, dims.heads, num_groups, **f32)
    value_sum = torch.empty(dims.batch, dims.heads, num_groups, dims.head_dim, **f32)
    has_mult = key_multiplier is not None
    mult_mass = torch.empty_like(mass) if has_mult else None
    mult_value = torch.empty_like(value_sum) if has_mult else None
    if num_splits > 1:
        part_max = torch.empty(batch_heads, num_splits, **f32)
        part_rows = torch.empty(batch_heads, num_splits, rows, **f32)
        part_acc = torch.empty(batch_heads, num_splits, rows, dims.head_dim, **f32)
    else:  # unused by the kernel
        part_max = part_rows = part_acc = mass

    def strides(tensor: Tensor | None, ndim: int) -> tuple[int, ...]:
        return tuple(tensor.stride()) if tensor is not None else (0,) * ndim

    block_d = max(16, triton.next_power_of_2(dims.head_dim))
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        _grouped_decode_kernel[(batch_heads, num_splits)](
            query, *query.stride(),
            key, *key.stride(),
            value, *value.stride(),
            group_ids, *group_ids.stride(),
            group_bias if group_bias is not None else mass, *strides(group_bias, 3),
            group_abs_gain if group_abs_gain is not None else mass, *strides(group_abs_gain, 3),
            key_multiplier if has_mult else mass, *strides(key_multiplier, 2),
            part_max, part_rows, part_acc,
            mass, value_sum, mult_mass if has_mult else mass, mult_value if has_mult else value_sum,
            dims.heads, dims.heads // dims.kv_heads, dims.kv_len, num_groups, num_splits, keys_per_split,
            float(scaling),
            HEAD_DIM=dims.head_dim, HAS_BIAS=group_bias is not None, HAS_GAIN=group_abs_gain is not None,
            HAS_MULT=has_mult, SINGLE_SPLIT=num_splits == 1,
            INPUT_PRECISION="ieee" if query.dtype == torch.float32 else None,  # exact fp32; 16-bit: default
            GROUP_PAD=MAX_GROUPS, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )
        if num_splits > 1:
            _grouped_decode_reduce_kernel[(batch_heads,)](
                part_max, part_rows, part_acc,
                mass, value_sum, mult_mass if has_mult else mass, mult_value if has_mult else value_sum,
                num_groups, num_splits,
                HEAD_DIM=dims.head_dim, HAS_MULT=has_mult, GROUP_PAD=MAX_GROUPS,
                BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=_NUM_WARPS,
            )
    return GroupedDecodeResult(mass=mass, value=value_sum, mult_mass=mult_mass, mult_value=mult_value)


# ----------------------------------------------------------------------------------------------------------
# 4. Public op
# ----------------------------------------------------------------------------------------------------------


def grouped_decode_backend(device: torch.device | str) -> str:
    """Which implementation `grouped_decode_attention` runs for tensors on `device`.

    Returns "triton-interpret" when triton is installed and was imported with `TRITON_INTERPRET=1` (its
    kernels then run on the CPU interpreter, whatever the device), "triton" on CUDA, else "reference"
    (also when the variable changed between importing triton and vlmfix.kernels; see
    `vlmfix.kernels._triton.matches_triton_mode`).
    """
    if not HAS_TRITON or not matches_triton_mode(_grouped_decode_kernel):
        return "reference"
    if is_interpreted(_grouped_decode_kernel):
        return "triton-interpret"
    return "triton" if torch.device(device).type == "cuda" else "reference"


def grouped_decode_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group_ids: Tensor,
    num_groups: int,
    scaling: float,
    group_bias: Tensor | None = None,
    group_abs_gain: Tensor | None = None,
    key_multiplier: Tensor | None = None,
) -> GroupedDecodeResult:
    """Softmax mass and value sum of each key group, per head, for one decode query, in one pass.

    z_j = scaling * q . k_j; then z_j += group_abs_gain[g(j)] * |z_j| (PAI's rule); then
    z_j += group_bias[g(j)]; p = softmax(z) over the unmasked keys. Accumulates in fp32. Runs the Triton
    kernel on CUDA (or interpreted when triton was imported with `TRITON_INTERPRET=1`), the PyTorch
    reference elsewhere.

    Args:
        query: [batch, heads, head_dim], float32/float16/bfloat16; the single decode query.
        key: [batch, kv_heads, kv_len, head_dim], query's dtype; heads % kv_heads == 0 (GQA). May be a
            non-contiguous view into a KV cache; never modified.
        value: like `key`.
        group_ids: [batch, kv_len] int32 in [0, num_groups), or -1 for a masked key (padding).
        num_groups: number of key groups, 1..8.
        scaling: logit scale, usually head_dim**-0.5.
        group_bias: optional [batch, heads, groups] float32 additive logit bias per group (-inf allowed).
        group_abs_gain: optional [batch, heads, groups] float32; z_j += gain[g(j)] * |z_j| before the bias.
        key_multiplier: optional [batch, kv_len] float32 per-key multiplier (all heads); fills `mult_*`.

    Returns:
        GroupedDecodeResult with fp32 `mass` [batch, heads, groups] and `value` [batch, heads, groups,
        head_dim] (and `mult_mass`, `mult_value` when `key_multiplier` is given). A head whose keys are all
        masked gets zeros.

    Example:
        >>> q, k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
        >>> ids = torch.tensor([[-1, 0, 0, 1, 1]], dtype=torch.int32)
        >>> res = grouped_decode_attention(q, k, v, ids, num_groups=2, scaling=16**-0.5)
        >>> res.mass.sum(-1)  # doctest: +SKIP
        tensor([[1.0000, 1.0000]])
    """
    if grouped_decode_backend(query.device) == "reference":
        impl = grouped_decode_attention_reference
    else:
        impl = grouped_decode_attention_triton
    return impl(query, key, value, group_ids, num_groups, scaling, group_bias, group_abs_gain, key_multiplier)
