"""One query row whose edits are key biases only (PAI's z + alpha * |z|): SDPA with an additive bias.

A `KeyBias` changes the scores of the keys where its `bias` or `abs_gain` is nonzero, and these lie in
the prompt (generated keys take 0). For one query row (a decode step, or the prompt's last row) the
edited attention is therefore

    softmax(z + mask + delta) @ v,   delta_j = sum over edits (bias_j + abs_gain_j * |z_j|) on the biased keys j,

which is SDPA with the additive mask `mask + delta`: only the biased keys' scores z_j need computing
explicitly (fp32, as on the PyTorch edit path; the mask is added in the query's dtype), and SDPA does the
rest in the cache's own dtype, with grouped key/value heads and no fp32 copy of the cache. The biased keys'
span, each edit's terms on it and the rows each edit selects are prepared once per prompt (`KeyBiasPlans`)
and reused by every layer and step; rows an edit does not select (`from_position`) get no delta.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfix.decoding.edits import (
    Edit,
    HeadScale,
    KeyBias,
    fit_keys,
    fit_rows,
    scale_heads,
    windowed_mask,
)


@dataclass(frozen=True)
class KeyBiasTerm:
    """One `KeyBias` on the span of biased keys: bias + gain * |z|, on the rows at or past `from_position`."""

    bias: Tensor | None  # [batch, heads or 1, 1, span] fp32
    gain: Tensor | None  # [batch, heads or 1, 1, span] fp32
    from_position: Tensor | None  # [batch] long
    latest_start: int  # the largest from_position (0 without): rows at or past it are all selected


@dataclass(frozen=True)
class KeyBiasPlan:
    """An edit list's key biases over the prompt: the biased keys lie in positions start .. stop - 1."""

    start: int
    stop: int
    terms: tuple[KeyBiasTerm, ...]


def plan_key_biases(edits: Sequence[Edit], batch: int, device: torch.device) -> KeyBiasPlan | None:
    """The plan of `edits` for a forward of `batch` rows, or None when they are not key biases (and head scales)
    only. One host sync: the span of the biased keys."""
    if not edits or not all(isinstance(e, (KeyBias, HeadScale)) for e in edits):
        return None
    biases = [e for e in edits if isinstance(e, KeyBias)]
    if not biases:
        return None
    tensors = [t for e in biases for t in (e.bias, e.abs_gain) if t is not None]
    length = max((t.shape[-1] for t in tensors), default=0)
    touched = torch.zeros(length, dtype=torch.bool, device=device)
    for t in tensors:  # t: [plan_batch, heads or 1, keys]
        touched[: t.shape[-1]] |= (t.to(device) != 0).flatten(0, 1).any(0)
    columns = touched.nonzero().flatten().tolist()
    start, stop = (columns[0], columns[-1] + 1) if columns else (0, 0)

    def span(t: Tensor | None) -> Tensor | None:  # [plan_batch, heads or 1, keys] -> [batch, heads or 1, 1, span]
        if t is None or stop == start:
            return None
        return fit_keys(t.to(device).float(), stop, batch, 0.0)[..., start:stop, None].transpose(-1, -2)

    def term(e: KeyBias) -> KeyBiasTerm:
        if e.from_position is None:
            return KeyBiasTerm(span(e.bias), span(e.abs_gain), None, 0)
        from_position = fit_rows(e.from_position.to(device), batch)
        return KeyBiasTerm(span(e.bias), span(e.abs_gain), from_position, int(from_position.max()))

    return KeyBiasPlan(start, stop, tuple(term(e) for e in biases))


class KeyBiasPlans:
    """Key-bias plans per edit list, made once per prompt (keyed by the identity of the edit objects, which
    methods plan once per prompt; clear it when a prompt ends); at most `capacity` lists, least recent dropped.
    An entry holds its edits, so that no other edit list can take their ids while the entry lives."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[tuple[Edit, ...], KeyBiasPlan | None]] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def get(self, edits: Sequence[Edit], batch: int, device: torch.device) -> KeyBiasPlan | None:
        key = (batch, str(device), *map(id, edits))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][1]
        plan = plan_key_biases(edits, batch, device)
        self._entries[key] = (tuple(edits), plan)  # the edits kept alive: their ids stay theirs
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return plan


def key_bias_row_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    edits: Sequence[Edit],
    plans: KeyBiasPlans | None = None,
    *,
    sliding_window: int | None = None,
) -> Tensor | None:
    """The edited attention of one query row, [batch, 1, heads, value head_dim], or None when `edits` are not
    key biases (and head scales) only.

    query: [batch, heads, 1, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim]; attention_mask: the
    backend's (None = causal, a [batch, kv_len] padding mask, or 4-D for this row). No logit softcap (SDPA
    cannot apply it): callers with one use the PyTorch edit path. The biases are computed in fp32 and added in the
    query's dtype.
    """
    every_row = [(slice(0, query.shape[0]), list(edits))]
    return key_bias_blocks_output(query, key, value, attention_mask, scaling, every_row, plans,
                                  sliding_window=sliding_window)


def key_bias_blocks_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    blocks: Sequence[tuple[slice, list[Edit]]],
    plans: KeyBiasPlans | None = None,
    *,
    sliding_window: int | None = None,
) -> Tensor | None:
    """`key_bias_row_output` for a forward whose row blocks have their own edits (`stream_blocks`: a two-stream
    forward's edited and unedited streams), in one SDPA call over every row: rows without edits get their mask
    alone. None unless some block has edits and every block's edits are key biases (and head scales) only."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    device = query.device
    if q_len != 1:
        return None
    planned: list[tuple[slice, list[Edit], KeyBiasPlan | None]] = []  # per row block; no plan: a block without edits
    for rows, edits in blocks:
        plan = None
        if edits:
            count = len(range(*rows.indices(batch)))
            plan = plans.get(edits, count, device) if plans is not None else plan_key_biases(edits, count, device)
            if plan is None or plan.stop > kv_len:
                return None
        planned.append((rows, edits, plan))
    if all(plan is None for _, _, plan in planned):
        return None
    scaling = head_dim**-0.5 if scaling is None else scaling
    # fp32, [batch, heads or 1, 1, kv_len]: each edited block's delta on its span, padded with zeros to every key
    # and row (rows without edits, keys outside the span); the blocks are consecutive rows (`stream_blocks`)
    bias: Tensor | None = None
    for rows, _, plan in planned:
        if plan is not None and plan.stop > plan.start:
            first, end, _ = rows.indices(batch)
            delta = _span_delta(query[rows], key[rows, :, plan.start:plan.stop], scaling, plan, kv_len)
            padded = F.pad(delta, (plan.start, kv_len - plan.stop, 0, 0, 0, 0, first, batch - end))
            bias = padded if bias is None else bias + padded
    if bias is None:  # every edited block's biases are empty: the mask alone
        bias = torch.zeros(batch, 1, 1, kv_len, dtype=torch.float32, device=device)
    # SDPA takes the mask in the query's dtype on every device: a bf16/fp16 model adds the biases (computed in fp32)
    # rounded to its own dtype, as it rounds the keys and queries its attention reads
    bias = _masked(bias, attention_mask, kv_len, sliding_window).to(query.dtype)  # [batch, heads or 1, 1, kv_len]
    # the one query row of each head packed as its key/value head's rows ([batch, kv_heads, group, head_dim]): SDPA
    # runs on the cache's key/value heads as they are, with no repeated copy and no enable_gqa (which, with a mask,
    # leaves CUDA on SDPA's math kernel)
    group = heads // kv_heads
    packed = query.reshape(batch, kv_heads, group, head_dim)
    mask = bias.reshape(batch, kv_heads, group, kv_len) if bias.shape[1] == heads else bias
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2)  # [batch, 1, heads, value head_dim]
    for rows, edits, _ in planned:
        if any(isinstance(e, HeadScale) for e in edits):
            out[rows] = scale_heads(out[rows], edits, kv_len)
    return out


def _masked(bias: Tensor, attention_mask: Tensor | None, kv_len: int, sliding_window: int | None) -> Tensor:
    """`bias` with the last row's mask applied (-inf on hidden keys), [batch, heads, 1, kv_len] fp32. A bool 4-D mask
    (SDPA's, which holds any sliding window) is applied in one `where`; others through `_row_mask`."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        return torch.where(attention_mask[..., -1:, -kv_len:], bias, -math.inf)  # mask: [batch or 1, 1 or heads, 1, kv]
    mask = _row_mask(attention_mask, bias.shape[0], kv_len, sliding_window, bias.device)
    return bias if mask is None else bias + mask


def _row_mask(attention_mask: Tensor | None, batch: int, kv_len: int, sliding_window: int | None,
              device: torch.device) -> Tensor | None:
    """The last row's additive mask (0 or -inf), [batch or 1, 1, 1, kv_len] fp32; None when every key is visible
    (no mask at one row is the last row of a causal mask), bar those past a sliding window."""
    if attention_mask is None and (sliding_window is None or kv_len <= sliding_window):
        return None
    return windowed_mask(attention_mask, batch, 1, kv_len, sliding_window, device)


def _span_delta(query: Tensor, span_keys: Tensor, scaling: float, plan: KeyBiasPlan, kv_len: int) -> Tensor:
    """delta on the span of biased keys, [batch, heads or 1, 1, span] fp32, from the span's scores z (fp32)."""
    batch, heads, _, head_dim = query.shape
    kv_heads, span = span_keys.shape[1], span_keys.shape[2]
    abs_z: Tensor | None = None  # bias-only edits (SID's) need no scores
    if any(term.gain is not None for term in plan.terms):
        # query: [batch, heads, 1, head_dim] -> [batch, kv_heads, heads / kv_heads, head_dim]: each key head's queries
        grouped = query.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
        z = torch.matmul(grouped, span_keys.float().transpose(-1, -2)).mul_(scaling)  # [batch, kv_heads, group, span]
        abs_z = z.reshape(batch, heads, 1, span).abs_()
    position = kv_len - 1  # the row's position in the sequence
    parts = []
    for term in plan.terms:
        if term.gain is None or abs_z is None:
            if term.bias is None:
                continue
            part = term.bias
        else:
            part = term.gain * abs_z if term.bias is None else term.bias + term.gain * abs_z
        if term.from_position is not None and position < term.latest_start:  # some row not yet selected
            part = torch.where((position >= term.from_position)[:, None, None, None], part, 0.0)
        parts.append(part)
    # parts is never empty: a plan with no bias or gain has an empty span, which the caller skips
    return functools.reduce(torch.add, parts)
