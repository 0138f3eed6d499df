"""The attention-edit vocabulary and the one PyTorch function that applies it.

Methods *plan* edits (frozen dataclasses below); `edited_attention` *applies* them inside vlmfix's
attention function. Key sets are boolean masks over the prompt's positions (left-padded input_ids
coordinates); keys past the prompt (generated tokens) belong to no set.

Streams: in a two-stream (contrastive) forward the batch is [positive rows; negative rows]. An edit's
`stream` names the rows it may touch: None (the default) the rows the session edits (every row, or the
positive rows when the contrastive method keeps the negative stream unedited), "positive" the positive
rows (every row of a one-stream forward), "negative" the negative rows (no row of a one-stream forward).
The attention function resolves it with the engine's row layout (`stream_blocks`).

Composition order in one layer, for the query rows each edit selects:
  1. pre-softmax: every `KeyBias`, summed (z' = z + sum(bias) + sum(abs_gain) * |z|, |z| of the
     unedited scaled score);
  2. softmax (fp32);
  3. post-softmax edits, in plan order (methods in the order given, edits in the order planned),
     each seeing the previous one's probabilities: `Reweight`, `Transfer`, `FusionReweight`;
  4. probabilities @ values;
  5. `HeadScale`, multiplied together, on each head's output before `o_proj`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

RowScope = Literal["all", "last"]
StreamScope = Literal["positive", "negative"] | None
STREAMS = (None, "positive", "negative")


@dataclass(frozen=True, kw_only=True)
class Edit:
    """Base of every edit: which query rows it applies to.

    Args:
        rows: "all" rows of each forward, or only the "last" one (the newest token).
        from_position: [batch] long, optional: edit only query rows whose absolute position (in the
            padded prompt coordinates) is at least this; decode rows always qualify.
        stream: None (the rows the session edits), "positive" or "negative": the stream whose rows the
            edit touches in a two-stream forward (see the module docstring). Tensors of a stream edit
            have one row per prompt of that stream (B rows, not 2B).
    """

    rows: RowScope = "all"
    from_position: Tensor | None = None
    stream: StreamScope = None

    def __post_init__(self) -> None:
        if self.rows not in ("all", "last"):
            raise ValueError(f"rows must be 'all' or 'last', got {self.rows!r}.")
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be None, 'positive' or 'negative', got {self.stream!r}.")


@dataclass(frozen=True, kw_only=True)
class KeyBias(Edit):
    """Pre-softmax: z[b, h, i, j] += bias[b, h, j] + abs_gain[b, h, j] * |z[b, h, i, j]|.

    Args:
        bias: [batch, heads or 1, keys] additive logit bias (0 = no change).
        abs_gain: [batch, heads or 1, keys] PAI's rule z + a*|z| (0 = no change).
    """

    bias: Tensor | None = None
    abs_gain: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class Reweight(Edit):
    """Post-softmax: multiply key weights by `multiplier`, then renormalise each edited row.

    Args:
        multiplier: [batch, heads or 1, keys] non-negative (1 = no change).
        top_heads_by: [batch, keys] bool, optional: edit only the `top_heads` heads with the largest
            mass on this key set, chosen per row and query from the current probabilities.
        top_heads: how many heads `top_heads_by` selects.
    """

    multiplier: Tensor
    top_heads_by: Tensor | None = None
    top_heads: int = 0


@dataclass(frozen=True, kw_only=True)
class Transfer(Edit):
    """Post-softmax, mass-conserving: move `fraction` of the `source` mass to `receivers`, in proportion
    to the receivers' weights, on the (row, head, query) triples the gate selects.

    Gate (from the current, unmodified masses): m_gate = mass on `gate_keys`, m_recv = mass on
    `receivers`; selected iff m_gate >= min_gate_mass and m_recv / m_gate >= min_receiver_share and
    m_recv > 0 and (not require_gate_source or `source & gate_keys` is non-empty for the row).

    Args:
        source: [batch, keys] bool, the keys that give mass (each scaled by 1 - fraction).
        receivers: [batch, keys] bool, disjoint from source.
        fraction: in [0, 1].
        gate_keys: [batch, keys] bool, optional (default: source | receivers).
        heads: [batch, heads] bool, optional head eligibility.
    """

    source: Tensor
    receivers: Tensor
    fraction: float
    gate_keys: Tensor | None = None
    min_gate_mass: float = 0.0
    min_receiver_share: float = 0.0
    require_gate_source: bool = False
    heads: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}.")


@dataclass(frozen=True, kw_only=True)
class FusionReweight(Edit):
    """Post-softmax, GIFT's fusion edit: in the top `head_fraction` of heads by image mass, multiply image
    keys by `multiplier`; in the top `head_fraction` of heads by query mass, multiply query keys by
    beta * r, with r = (multiplied image mass) / (image mass) pooled over the image heads; renormalise
    every edited head.

    Args:
        image: [batch, keys] bool.  multiplier: [batch, keys] >= 0 (used on image keys).
        query: [batch, keys] bool.  beta: query factor.  head_fraction: share of heads chosen.
    """

    image: Tensor
    multiplier: Tensor
    query: Tensor
    beta: float = 1.0
    head_fraction: float = 0.5


@dataclass(frozen=True, kw_only=True)
class HeadScale(Edit):
    """Scale each head's attention output before `o_proj`: out[b, i, h, :] *= scale[b, h]."""

    scale: Tensor


PRE_SOFTMAX = (KeyBias,)
POST_SOFTMAX = (Reweight, Transfer, FusionReweight)


def stream_blocks(
    edits: Sequence[Edit], batch: int, edited_rows: int | None, negative_start: int | None
) -> list[tuple[slice, list[Edit]]]:
    """The row blocks of one forward of `batch` rows, each with the edits (in plan order) that touch it.

    edited_rows: the session's default edit rows, 0 .. edited_rows - 1 (None: all rows);
    negative_start: the first negative row of a two-stream forward (None: a one-stream forward).
    Rows of an edit: stream None -> [0, edited_rows); "positive" -> [0, negative_start); "negative" ->
    [negative_start, batch) (none in a one-stream forward). The blocks cover 0 .. batch - 1 in order.
    """
    default_end = batch if edited_rows is None else min(edited_rows, batch)
    split = batch if negative_start is None else min(negative_start, batch)
    extent = {None: (0, default_end), "positive": (0, split), "negative": (split, batch)}
    bounds = sorted({0, batch, default_end, split})
    blocks = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        covering = [e for e in edits if extent[e.stream][0] <= low and high <= extent[e.stream][1]]
        blocks.append((slice(low, high), covering))
    return blocks


# ---------------------------------------------------------------------------------------------
# helpers over key sets


def fit_keys(keys: Tensor, kv_len: int, batch: int, fill: float | bool) -> Tensor:
    """Pad or cut a key tensor [plan_batch, ..., prompt_len] to [batch, ..., kv_len].

    Keys past the prompt take `fill`; a batch that repeats each plan row k times (beams,
    num_return_sequences) gets each row repeated.
    """
    if keys.shape[0] != batch:
        if batch % keys.shape[0]:
            raise ValueError(f"edit planned for batch {keys.shape[0]} cannot serve a batch of {batch}.")
        keys = keys.repeat_interleave(batch // keys.shape[0], dim=0)
    length = keys.shape[-1]
    if length >= kv_len:
        return keys[..., :kv_len]
    pad = keys.new_full((*keys.shape[:-1], kv_len - length), fill)
    return torch.cat([keys, pad], dim=-1)


def fit_rows(values: Tensor, batch: int) -> Tensor:
    """[plan_batch, ...] -> [batch, ...] with each row repeated (beams, num_return_sequences)."""
    if values.shape[0] == batch:
        return values
    if batch % values.shape[0]:
        raise ValueError(f"edit planned for batch {values.shape[0]} cannot serve a batch of {batch}.")
    return values.repeat_interleave(batch // values.shape[0], dim=0)


def selects_every_row(edit: Edit, q_len: int) -> bool:
    """Whether `row_mask` of `edit` is all True in a forward of `q_len` query rows (then callers skip it)."""
    return edit.from_position is None and (edit.rows != "last" or q_len == 1)


def row_mask(edit: Edit, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """[batch, q_len] bool: the query rows `edit` applies to in this forward."""
    rows = torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if edit.rows == "last":
        rows[:, :-1] = False
    if edit.from_position is not None:
        positions = torch.arange(kv_len - q_len, kv_len, device=device)
        start = fit_rows(edit.from_position.to(device), batch)
        rows &= positions[None, :] >= start[:, None]
    return rows


def additive_mask(
    attention_mask: Tensor | None, batch: int, q_len: int, kv_len: int, device: torch.device
) -> Tensor:
    """[batch or 1, 1 or heads, q_len, kv_len] fp32 additive mask (0 or -inf) from whatever the backend got (a
    4-D mask keeps its head axis: MiniMax M3's sparse layers pass one per head, each key-value group's own keys).

    `None` means causal (bottom-right aligned: query i sits at position kv_len - q_len + i); a 2-D
    mask is a padding mask over keys (flash backends), combined with causality; 4-D masks are bool
    (True = attend) or additive floats.
    """
    if attention_mask is None or attention_mask.dim() == 2:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        allowed = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf)
    mask = attention_mask[..., -kv_len:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, -math.inf)
    return mask.float().masked_fill(mask <= torch.finfo(mask.dtype).min, -math.inf)


def within_window(q_len: int, kv_len: int, window: int, device: torch.device) -> Tensor:
    """[q_len, kv_len] bool: keys inside each query's sliding window (query i sits at kv_len - q_len + i)."""
    query_positions = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return query_positions - torch.arange(kv_len, device=device)[None] < window


def windowed_mask(attention_mask: Tensor | None, batch: int, q_len: int, kv_len: int, sliding_window: int | None,
                  device: torch.device) -> Tensor:
    """`additive_mask`, with the keys outside a sliding-window layer's window masked too where the backend's mask
    does not hold the window (no mask, or a 2-D padding mask; a 4-D mask already holds it)."""
    mask = additive_mask(attention_mask, batch, q_len, kv_len, device)  # [batch or 1, 1 or heads, q_len, kv_len]
    if sliding_window is None or (attention_mask is not None and attention_mask.dim() == 4):
        return mask
    return mask.masked_fill(~within_window(q_len, kv_len, sliding_window, device), float("-inf"))


def _heads_of(t: Tensor, heads: int) -> Tensor:
    """[batch, heads or 1, keys] -> [batch, heads, 1, keys] for broadcasting over query rows."""
    return t.expand(t.shape[0], heads, t.shape[-1])[:, :, None, :]


def top_k_mask(scores: Tensor, count: int, dim: int = -1) -> Tensor:
    """Bool like `scores`, True on the `count` largest entries along `dim` (count clipped to the size)."""
    count = max(0, min(count, scores.shape[dim]))
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        chosen.scatter_(dim, scores.topk(count, dim=dim).indices, True)
    return chosen


def _top_heads(mass: Tensor, count: int) -> Tensor:
    """mass: [batch, heads, q] -> bool [batch, heads, q], True on the `count` largest heads per (b, q)."""
    return top_k_mask(mass, count, dim=1)


# ---------------------------------------------------------------------------------------------
# post-softmax edits on probabilities p: [batch, heads, q_len, kv_len] fp32


def apply_reweight(p: Tensor, edit: Reweight, edited: Tensor) -> Tensor:
    """edited: [batch, heads, q_len] bool, the (head, row) pairs the edit may touch."""
    batch, heads, _, kv_len = p.shape
    mult = _heads_of(fit_keys(edit.multiplier.float(), kv_len, batch, 1.0), heads)
    if edit.top_heads_by is not None:
        keys = fit_keys(edit.top_heads_by, kv_len, batch, False)[:, None, None, :]
        edited = edited & _top_heads((p * keys).sum(-1), edit.top_heads)
    new = p * mult
    new = new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(edited[..., None], new, p)


@dataclass(frozen=True)
class TransferGate:
    """Which (row, head, query) triples a `Transfer` selects on probabilities p, and the masses it moves.

    source, receivers: [batch, 1, 1, kv_len] bool; selected, moved, receiver_mass: [batch, heads, q_len].
    """

    source: Tensor
    receivers: Tensor
    selected: Tensor
    moved: Tensor  # Omega = fraction * (mass on the source keys)
    receiver_mass: Tensor


def transfer_gate(p: Tensor, edit: Transfer) -> TransferGate:
    """The gate of `edit` on unmodified probabilities p: [batch, heads, q_len, kv_len] (rows not yet restricted
    to the ones the edit applies to)."""
    batch, heads, _, kv_len = p.shape
    source = fit_keys(edit.source, kv_len, batch, False)[:, None, None, :]
    receivers = fit_keys(edit.receivers, kv_len, batch, False)[:, None, None, :]
    gate_keys = source | receivers if edit.gate_keys is None else fit_keys(edit.gate_keys, kv_len, batch, False)[
        :, None, None, :
    ]
    m_source = (p * source).sum(-1)  # [batch, heads, q]
    m_recv = (p * receivers).sum(-1)
    m_gate = (p * gate_keys).sum(-1)
    share = torch.where(m_gate > 0, m_recv / m_gate.clamp_min(1e-30), torch.zeros_like(m_gate))
    selected = (m_gate >= edit.min_gate_mass) & (share >= edit.min_receiver_share) & (m_recv > 0)
    if edit.require_gate_source:
        selected &= (source & gate_keys).any(-1)
    if edit.heads is not None:
        selected &= fit_rows(edit.heads, batch)[:, :, None]
    return TransferGate(source, receivers, selected, edit.fraction * m_source, m_recv)


def apply_transfer(p: Tensor, edit: Transfer, edited: Tensor) -> Tensor:
    gate = transfer_gate(p, edit)
    gain = 1.0 + gate.moved / gate.receiver_mass.clamp_min(1e-30)
    new = torch.where(gate.source, p * (1.0 - edit.fraction), torch.where(gate.receivers, p * gain[..., None], p))
    return torch.where((gate.selected & edited)[..., None], new, p)


def apply_fusion(p: Tensor, edit: FusionReweight, edited: Tensor) -> Tensor:
    batch, heads, _, kv_len = p.shape
    image = fit_keys(edit.image, kv_len, batch, False)[:, None, None, :]
    query = fit_keys(edit.query, kv_len, batch, False)[:, None, None, :]
    mult = fit_keys(edit.multiplier.float(), kv_len, batch, 1.0)[:, None, None, :]
    count = math.floor(heads * edit.head_fraction)
    image_mass = (p * image).sum(-1)  # [batch, heads, q]
    image_heads = _top_heads(image_mass, count) & edited
    query_heads = _top_heads((p * query).sum(-1), count) & edited
    weighted = (p * image * mult).sum(-1)
    pooled_o = (image_mass * image_heads).sum(1, keepdim=True)  # [batch, 1, q]
    pooled_e = (weighted * image_heads).sum(1, keepdim=True)
    ratio = torch.where(pooled_o > 0, pooled_e / pooled_o.clamp_min(1e-30), torch.ones_like(pooled_o))
    factor = torch.ones_like(p)
    factor = torch.where(image & image_heads[..., None], mult.expand_as(p), factor)
    factor = torch.where(query & query_heads[..., None], (edit.beta * ratio)[..., None].expand_as(p), factor)
    new = p * factor
    new = new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where((image_heads | query_heads)[..., None], new, p)


# edit type -> apply(p, edit, edited), the probability-stage edits
POST_APPLY: dict[type[Edit], Callable[[Tensor, Any, Tensor], Tensor]] = {
    Reweight: apply_reweight, Transfer: apply_transfer, FusionReweight: apply_fusion,
}


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """[batch, kv_heads, kv_len, head_dim] -> [batch, heads, kv_len, head_dim] (GQA)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def attention_scores(query: Tensor, key: Tensor, scaling: float | None, softcap: float | None = None) -> Tensor:
    """fp32 scaled scores z = scaling * q . k (then the layer's softcap), before any edit or mask.

    query: [batch, heads, q_len, head_dim]; key: [batch, kv_heads, kv_len, head_dim] -> [batch, heads, q_len, kv_len].
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    z = torch.matmul(query.float(), repeat_kv(key, query.shape[1]).float().transpose(-1, -2)) * scaling
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def key_biased_scores(z: Tensor, edits: Sequence[Edit]) -> Tensor:
    """The pre-softmax stage: z [batch, heads, q_len, kv_len] (the last q_len positions of a kv_len sequence) with
    every `KeyBias` of `edits` added on the query rows it selects, bias + abs_gain * |z| (a new tensor).

    The one place PAI's z + alpha * |z| is computed on the PyTorch path; PAI's recorded gain reads it too."""
    batch, heads, q_len, kv_len = z.shape
    for edit in edits:
        if not isinstance(edit, KeyBias):
            continue
        rows = row_mask(edit, batch, q_len, kv_len, z.device)[:, None, :, None]
        delta = torch.zeros_like(z)
        if edit.bias is not None:
            delta = delta + _heads_of(fit_keys(edit.bias.float(), kv_len, batch, 0.0), heads)
        if edit.abs_gain is not None:
            delta = delta + _heads_of(fit_keys(edit.abs_gain.float(), kv_len, batch, 0.0), heads) * z.abs()
        z = torch.where(rows, z + delta, z)  # not z + delta * rows: a -inf bias times 0 is NaN
    return z


def with_sink_column(z: Tensor, sinks: Tensor | None) -> Tensor:
    """z [batch, heads, q_len, kv_len] or [heads, q_len, kv_len] (fp32, masked) with each head's learned sink
    logit appended as one more column (gpt-oss-style attention sinks: the attention function's `s_aux`, HY V4
    VL's `sinks`), or z itself without sinks. The sink is a key past the prompt: in no key set, with no value
    (its column is dropped before the values are read), so a softmax over it keeps the sink's share out of
    every key's weight."""
    if sinks is None:
        return z
    column = sinks.to(device=z.device, dtype=z.dtype).reshape(-1, 1, 1).expand(*z.shape[:-1], 1)  # heads at dim -3
    return torch.cat([z, column], dim=-1)  # [batch, heads, q_len, kv_len + 1]


def key_probabilities(z: Tensor, sinks: Tensor | None = None) -> Tensor:
    """Attention probabilities over the keys of z [batch, heads, q_len, kv_len] (fp32, masked): the softmax, with
    each head's sink logit (`sinks`: [heads], or None) in the denominator, as the model's own eager attention
    computes them (softmax over [z, sink], sink column dropped). A row with every key masked gets 0."""
    p = torch.softmax(with_sink_column(z, sinks), dim=-1).nan_to_num(0.0)
    return p[..., : z.shape[-1]]


def edited_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    edits: Sequence[Edit],
    *,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention with `edits` applied, in plain PyTorch; returns [batch, q_len, heads, head_dim].

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim].
    Rows no edit selects get exactly the unedited softmax attention (fp32), cast to value's dtype.
    `softcap` (Gemma 2 style, `softcap * tanh(z / softcap)` on the logits before any edit), `sliding_window`
    (keys older than the window are masked when no 4-D mask is given; a 4-D mask already holds the window) and
    `sinks` ([heads]: each head's learned sink logit, one more softmax column with no value; `with_sink_column`)
    are the attention layer's own keyword arguments. Post-softmax edits see the sink as a key in no set with
    multiplier 1: a reweight that renormalises gives the sink its share, as the same edit made on logits would.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    z = key_biased_scores(attention_scores(query, key, scaling, softcap), edits)  # [batch, heads, q_len, kv_len]
    device = query.device
    z = z + windowed_mask(attention_mask, batch, q_len, kv_len, sliding_window, device)
    # [batch, heads, q_len, kv_len (+ 1 sink)]; fully masked rows (left padding) -> 0 (or all on the sink)
    p = torch.softmax(with_sink_column(z, sinks), dim=-1).nan_to_num(0.0)
    for edit in edits:
        apply = POST_APPLY.get(type(edit))
        if apply is not None:
            rows = row_mask(edit, batch, q_len, kv_len, device)[:, None, :].expand(batch, heads, q_len)
            p = apply(p, edit, rows)
    p = p[..., :kv_len]  # the sink column has no value
    v = repeat_kv(value, heads)
    out = torch.matmul(p, v.float()).to(value.dtype).transpose(1, 2)  # [batch, q_len, heads, head_dim]
    return scale_heads(out, edits, kv_len)


def scale_heads(out: Tensor, edits: Sequence[Edit], kv_len: int) -> Tensor:
    """Apply every `HeadScale` in `edits` to out: [batch, q_len, heads, head_dim]."""
    batch, q_len, heads, _ = out.shape
    for edit in edits:
        if isinstance(edit, HeadScale):
            factor = fit_rows(edit.scale.to(out.device), batch)[:, None, :].to(out.dtype)  # [batch, 1, heads]
            if not selects_every_row(edit, q_len):  # rows it leaves alone
                rows = row_mask(edit, batch, q_len, kv_len, out.device)  # [batch, q_len]
                factor = torch.where(rows[..., None], factor, torch.ones_like(factor))
            out = out * factor[..., None]
    return out
