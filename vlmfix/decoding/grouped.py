"""Decode-step edits through the grouped Triton kernel: edits -> key groups -> kernel -> epilogue.

At a decode step (one query row) every edit in the vocabulary acts on a few key sets. Keys that
every edit treats alike form one group (at most 8 per row); the kernel returns each group's softmax
mass and value sum per head (plain, and weighted by the one per-key multiplier GIFT-style edits use),
after the pre-softmax rule. The post-softmax edits then run on groups instead of keys:

    p'_j  is proportional to  p_j * (c[g(j)] + d[g(j)] * M_j)

with per-(row, head, group) coefficients c (plain part) and d (multiplied part), starting at c = 1,
d = 0. A `Transfer` scales c and d of the source and receiver groups; a `Reweight` or
`FusionReweight` moves c into d on the groups whose keys are multiplied; masses for gates and head
choices come from the current coefficients. The output is
sum_g (c_g value_g + d_g mult_value_g) / sum_g (c_g mass_g + d_g mult_mass_g), then `HeadScale`.
Anything this form cannot express (a key multiplied twice, two different multipliers, more than 8
groups) returns None and the caller uses the PyTorch path.

Edits are planned once per prompt over the prompt's keys, and every generated key takes the same fill
values, so a prompt's groups (and each key set's groups, each group's bias) are fixed for the whole
generation: `KeyGroupCache` derives them at the first decode step and extends them by one key per step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlmfix.decoding.edits import (
    Edit,
    FusionReweight,
    HeadScale,
    KeyBias,
    Reweight,
    Transfer,
    additive_mask,
    fit_keys,
    fit_rows,
    row_mask,
    scale_heads,
    top_k_mask,
)

MAX_GROUPS = 8


class _Unsupported(Exception):
    """The edits do not fit the grouped form; fall back to the PyTorch path."""


def _per_head(t: Tensor, heads: int) -> Tensor:
    """[batch, heads or 1, kv] -> [batch, heads, kv]."""
    return t.expand(t.shape[0], heads, t.shape[-1])


def _features(edits: Sequence[Edit], batch: int, heads: int, kv_len: int) -> tuple[list[Tensor], Tensor | None]:
    """Per-key features that define groups ([batch, n, kv] each) and the one key multiplier, if any."""
    features: list[Tensor] = []
    multiplier: Tensor | None = None

    def take_multiplier(m: Tensor) -> None:
        nonlocal multiplier
        if multiplier is not None and not torch.equal(multiplier, m):
            raise _Unsupported("two different key multipliers")
        multiplier = m

    for edit in edits:
        if isinstance(edit, KeyBias):
            for t in (edit.bias, edit.abs_gain):
                if t is not None:
                    features.append(_per_head(fit_keys(t.float(), kv_len, batch, 0.0), heads))
        elif isinstance(edit, Transfer):
            gate = edit.source | edit.receivers if edit.gate_keys is None else edit.gate_keys
            for t in (edit.source, edit.receivers, gate):
                features.append(fit_keys(t, kv_len, batch, False)[:, None].float())
        elif isinstance(edit, Reweight):
            mult = edit.multiplier.float()
            if mult.dim() == 3 and mult.shape[1] != 1:
                raise _Unsupported("per-head multipliers")
            mult = fit_keys(mult.reshape(mult.shape[0], -1), kv_len, batch, 1.0)
            features.append((mult != 1)[:, None].float())
            take_multiplier(mult)
            if edit.top_heads_by is not None:
                features.append(fit_keys(edit.top_heads_by, kv_len, batch, False)[:, None].float())
        elif isinstance(edit, FusionReweight):
            features.append(fit_keys(edit.image, kv_len, batch, False)[:, None].float())
            features.append(fit_keys(edit.query, kv_len, batch, False)[:, None].float())
            take_multiplier(fit_keys(edit.multiplier.float(), kv_len, batch, 1.0))
    return features, multiplier


def key_groups(features: list[Tensor], valid: Tensor) -> tuple[Tensor, int]:
    """group_ids [batch, kv] (-1 where not valid) from the distinct feature columns of each row."""
    batch, kv_len = valid.shape
    if not features:
        return torch.where(valid, 0, -1).to(torch.int32), 1
    columns = torch.cat([f.reshape(batch, -1, kv_len) for f in features], dim=1)  # [batch, n, kv]
    ids = torch.full((batch, kv_len), -1, dtype=torch.int32, device=valid.device)
    count = 1
    for b in range(batch):
        _, inverse = torch.unique(columns[b, :, valid[b]].T, dim=0, return_inverse=True)
        ids[b, valid[b]] = inverse.to(torch.int32)
        count = max(count, int(inverse.max()) + 1 if inverse.numel() else 1)
    if count > MAX_GROUPS:
        raise _Unsupported(f"{count} key groups")
    return ids, count


def _plan_length(edits: Sequence[Edit]) -> int:
    """The key length the edits were planned for (the prompt length; 0 if they carry no key tensor)."""
    lengths = [0]
    for edit in edits:
        for name in ("bias", "abs_gain", "source", "receivers", "gate_keys", "multiplier", "top_heads_by",
                     "image", "query"):
            t = getattr(edit, name, None)
            if isinstance(t, Tensor):
                lengths.append(t.shape[-1])
    return max(lengths)


@dataclass
class KeyGroups:
    """The key groups of one decode step, and a memo of per-group values that stay fixed while the
    same edits serve the same prompt (membership of key sets, per-group biases)."""

    ids: Tensor  # [batch, kv_len] int32, -1 on keys no row attends to
    count: int
    multiplier: Tensor | None  # [batch, kv_len] the one per-key multiplier, if any
    memo: dict[tuple, Tensor] = field(default_factory=dict)

    def remember(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@dataclass
class _PromptGroups:
    edits: tuple[Edit, ...]  # held so that the ids in the cache key stay theirs
    prompt_valid: Tensor  # [batch, plan]
    prompt_ids: Tensor  # [batch, plan]
    generated_id: Tensor  # [batch, 1], the group of every key past the prompt
    count: int
    prompt_multiplier: Tensor | None  # [batch, plan]
    memo: dict[tuple, Tensor]


def compute_key_groups(edits: Sequence[Edit], batch: int, heads: int, kv_len: int, valid: Tensor) -> KeyGroups:
    """Key groups of one decode step, derived from scratch (raises _Unsupported)."""
    features, multiplier = _features(edits, batch, heads, kv_len)
    ids, count = key_groups(features, valid)
    return KeyGroups(ids, count, multiplier)


class KeyGroupCache:
    """Key groups per edit list, derived once per prompt and extended as generated keys arrive.

    Keyed by the identity of the edit objects (methods plan them once per prompt); holds at most
    `capacity` edit lists (one per distinct layer plan), least recently used dropped first.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _PromptGroups | None] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def get(self, edits: Sequence[Edit], batch: int, heads: int, kv_len: int, valid: Tensor) -> KeyGroups:
        """The groups of this step (raises _Unsupported when the edits do not fit the grouped form)."""
        plan = _plan_length(edits)
        if kv_len <= plan:  # no generated key yet (or edits planned past this step): nothing to reuse
            return compute_key_groups(edits, batch, heads, kv_len, valid)
        key = (batch, heads, plan, *map(id, edits))
        if key in self._entries:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            if entry is None:
                raise _Unsupported("cached verdict")
            if not torch.equal(entry.prompt_valid, valid[:, :plan]):
                entry = self._fill(key, edits, batch, heads, plan, valid)
        else:
            entry = self._fill(key, edits, batch, heads, plan, valid)
        generated = kv_len - plan
        ids = torch.cat([entry.prompt_ids, entry.generated_id.expand(batch, generated)], dim=1)
        ids = torch.where(valid, ids, -1)
        multiplier = None
        if entry.prompt_multiplier is not None:
            ones = entry.prompt_multiplier.new_ones(batch, generated)
            multiplier = torch.cat([entry.prompt_multiplier, ones], dim=1)
        return KeyGroups(ids, entry.count, multiplier, entry.memo)

    def _fill(self, key: tuple, edits: Sequence[Edit], batch: int, heads: int, plan: int,
              valid: Tensor) -> _PromptGroups:
        """Groups over the prompt's keys plus one generated key (all generated keys look alike)."""
        first = valid[:, : plan + 1].clone()
        first[:, plan] = True
        try:
            groups = compute_key_groups(edits, batch, heads, plan + 1, first)
        except _Unsupported:
            self._store(key, None)
            raise
        multiplier = groups.multiplier[:, :plan] if groups.multiplier is not None else None
        entry = _PromptGroups(tuple(edits), valid[:, :plan].clone(), groups.ids[:, :plan],
                              groups.ids[:, plan:], groups.count, multiplier, {})
        self._store(key, entry)
        return entry

    def _store(self, key: tuple, entry: _PromptGroups | None) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _group_of(keys: Tensor, ids: Tensor, groups: int) -> Tensor:
    """[batch, groups] bool: groups whose keys are in `keys` ([batch, kv] bool; groups are pure)."""
    member = torch.zeros(ids.shape[0], groups, dtype=torch.bool, device=ids.device)
    valid = ids >= 0
    for b in range(ids.shape[0]):
        member[b, ids[b, valid[b] & keys[b]].long()] = True
    return member


def _group_values(t: Tensor, ids: Tensor, groups: int) -> Tensor:
    """[batch, heads, kv] per-key values constant within groups -> [batch, heads, groups]."""
    batch, heads, _ = t.shape
    out = torch.zeros(batch, heads, groups, device=t.device)
    for b in range(batch):
        valid = ids[b] >= 0
        out[b][:, ids[b, valid].long()] = t[b][:, valid]
    return out


def grouped_decode_output(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    edits: Sequence[Edit],
    cache: KeyGroupCache | None = None,
) -> Tensor | None:
    """The edited attention of one decode row, [batch, 1, heads, head_dim], or None if not expressible.

    query: [batch, heads, 1, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim].
    cache: reuses the prompt's key groups across steps and layers (the session's); None derives them.
    """
    from vlmfix.kernels import grouped_decode_attention

    batch, heads, q_len, head_dim = query.shape
    if q_len != 1 or value.shape != key.shape:  # the kernels take values as wide as keys (not MLA's)
        return None
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] > 1:
        return None  # a mask per head (MiniMax M3's block selection per key-value group): the kernel takes one a row
    kv_len = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    device = query.device
    valid = additive_mask(attention_mask, batch, 1, kv_len, device)[:, 0, 0].expand(batch, kv_len) == 0
    try:
        found = (cache.get(edits, batch, heads, kv_len, valid) if cache is not None
                 else compute_key_groups(edits, batch, heads, kv_len, valid))
    except _Unsupported:
        return None
    ids, groups, multiplier = found.ids, found.count, found.multiplier
    applies = {id(e): bool(row_mask(e, batch, 1, kv_len, device).all()) for e in edits}
    bias = torch.zeros(batch, heads, groups, device=device)
    gain = torch.zeros(batch, heads, groups, device=device)

    def per_group(t: Tensor) -> Tensor:  # [batch, heads, groups]
        return found.remember(("values", id(t)), lambda: _group_values(
            _per_head(fit_keys(t.float(), kv_len, batch, 0.0), heads), ids, groups))

    for edit in edits:
        if isinstance(edit, KeyBias) and applies[id(edit)]:
            if edit.bias is not None:
                bias += per_group(edit.bias)
            if edit.abs_gain is not None:
                gain += per_group(edit.abs_gain)
    res = grouped_decode_attention(
        query[:, :, 0], key, value, ids, groups, scaling, group_bias=bias, group_abs_gain=gain,
        key_multiplier=multiplier,
    )
    mass, val = res.mass, res.value  # [batch, heads, groups], [batch, heads, groups, head_dim]
    mult_mass = res.mult_mass if res.mult_mass is not None else torch.zeros_like(mass)
    mult_val = res.mult_value if res.mult_value is not None else torch.zeros_like(val)
    c = torch.ones_like(mass)
    d = torch.zeros_like(mass)
    try:
        for edit in edits:
            if not applies[id(edit)] or isinstance(edit, (KeyBias, HeadScale)):
                continue
            c, d = _post_edit(edit, c, d, mass, mult_mass, found, heads, kv_len, batch)
    except _Unsupported:
        return None
    numerator = (c[..., None] * val + d[..., None] * mult_val).sum(2)
    denominator = (c * mass + d * mult_mass).sum(2).clamp_min(torch.finfo(torch.float32).tiny)
    out = (numerator / denominator[..., None]).to(value.dtype)[:, None]  # [batch, 1, heads, head_dim]
    return scale_heads(out, edits, kv_len)


def _post_edit(edit: Edit, c: Tensor, d: Tensor, mass: Tensor, mult_mass: Tensor, found: KeyGroups,
               heads: int, kv_len: int, batch: int) -> tuple[Tensor, Tensor]:
    """One post-softmax edit on the group coefficients (c, d): [batch, heads, groups]."""

    def current() -> Tensor:  # normalised current group masses
        m = c * mass + d * mult_mass
        return m / m.sum(-1, keepdim=True).clamp_min(1e-30)

    def multiply(groups_mask: Tensor, heads_mask: Tensor) -> tuple[Tensor, Tensor]:
        hit = groups_mask[:, None, :] & heads_mask[..., None]  # [batch, heads, groups]
        if (hit & (d != 0)).any():
            raise _Unsupported("a key multiplied twice")
        return torch.where(hit, 0.0, c), torch.where(hit, c, d)

    def member(keys: Tensor) -> Tensor:  # [batch, groups] bool
        return found.remember(("member", id(keys)), lambda: _group_of(
            fit_keys(keys, kv_len, batch, False), found.ids, found.count))

    def top(mass_: Tensor, count: int) -> Tensor:  # [batch, heads] -> the `count` largest heads per row
        return top_k_mask(mass_, count, dim=1)

    if isinstance(edit, Transfer):
        source, receivers = member(edit.source), member(edit.receivers)
        gate = source | receivers if edit.gate_keys is None else member(edit.gate_keys)
        p = current()
        m_src = (p * source[:, None]).sum(-1)
        m_recv = (p * receivers[:, None]).sum(-1)
        m_gate = (p * gate[:, None]).sum(-1)
        share = torch.where(m_gate > 0, m_recv / m_gate.clamp_min(1e-30), torch.zeros_like(m_gate))
        selected = (m_gate >= edit.min_gate_mass) & (share >= edit.min_receiver_share) & (m_recv > 0)
        if edit.require_gate_source:
            selected &= (source & gate).any(-1)[:, None]
        if edit.heads is not None:
            selected &= fit_rows(edit.heads, batch)
        factor = torch.ones_like(c)
        factor = torch.where(source[:, None], 1.0 - edit.fraction, factor)
        gain = 1.0 + edit.fraction * m_src / m_recv.clamp_min(1e-30)
        factor = torch.where(receivers[:, None], gain[..., None], factor)
        factor = torch.where(selected[..., None], factor, torch.ones_like(factor))
        return c * factor, d * factor
    if isinstance(edit, Reweight):
        multiplied = found.remember(("multiplied", id(edit.multiplier)), lambda: _group_of(fit_keys(
            edit.multiplier.float().reshape(edit.multiplier.shape[0], -1), kv_len, batch, 1.0) != 1,
            found.ids, found.count))
        heads_mask = torch.ones(batch, heads, dtype=torch.bool, device=c.device)
        if edit.top_heads_by is not None:
            heads_mask = top((current() * member(edit.top_heads_by)[:, None]).sum(-1), edit.top_heads)
        return multiply(multiplied, heads_mask)
    if isinstance(edit, FusionReweight):
        image, query = member(edit.image), member(edit.query)
        count = math.floor(heads * edit.head_fraction)
        p = current()
        image_heads = top((p * image[:, None]).sum(-1), count)
        query_heads = top((p * query[:, None]).sum(-1), count)
        norm = (c * mass + d * mult_mass).sum(-1).clamp_min(1e-30)  # [batch, heads]
        o = ((c * mass * image[:, None]).sum(-1) / norm * image_heads).sum(1)  # pooled image mass
        e = ((c * mult_mass * image[:, None]).sum(-1) / norm * image_heads).sum(1)  # pooled multiplied mass
        ratio = torch.where(o > 0, e / o.clamp_min(1e-30), torch.ones_like(o))  # [batch]
        c, d = multiply(image, image_heads)
        factor = torch.where(query[:, None] & query_heads[..., None], (edit.beta * ratio)[:, None, None],
                             torch.ones_like(c))
        return c * factor, d * factor
    raise _Unsupported(type(edit).__name__)
