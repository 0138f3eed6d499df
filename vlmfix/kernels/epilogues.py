"""Epilogues: each method's decode-step attention edit as a closed form over a `GroupedDecodeResult`.

Every function returns the attention output [batch, heads, head_dim] in fp32 (before `o_proj`), computed
from the per-group masses and value sums of `grouped_decode_attention`, never from materialised
probabilities. PAI and dual-stream need no epilogue: their rule z + a*|z| is the op's `group_abs_gain`,
followed by `plain_output`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmfix.kernels.grouped_decode import GroupedDecodeResult


def _check_groups(op: str, res: GroupedDecodeResult, **groups: int) -> None:
    num_groups = res.mass.shape[-1]
    for name, index in groups.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_groups:
            raise ValueError(f"{op}: `{name}` must be a group index in [0, {num_groups}), got {index!r}.")
    if len(set(groups.values())) != len(groups):
        raise ValueError(f"{op}: the groups {groups} must be distinct key groups.")


def plain_output(res: GroupedDecodeResult) -> Tensor:
    """Unedited attention output: the sum of the group value sums. Returns [batch, heads, head_dim]."""
    return res.value.sum(dim=2)


def var_selected_heads(
    res: GroupedDecodeResult,
    *,
    sink_group: int,
    vis_nonsink_group: int,
    summ: float,
    rho: float,
    visual_sink_present: Tensor | None = None,
) -> Tensor:
    """VAR's image-centric heads (var.md Step 2) from the unmodified masses. Returns bool [batch, heads].

    A head is selected when its image mass m_vis = m_vs + m_vn is >= `summ`, its non-sink ratio
    m_vn / m_vis is >= `rho`, and the row has visual sinks (`visual_sink_present`, bool [batch]; when
    None, a row has visual sinks where the head's visual-sink mass is > 0).
    """
    _check_groups("var_selected_heads", res, sink_group=sink_group, vis_nonsink_group=vis_nonsink_group)
    m_vs = res.mass[..., sink_group]  # [batch, heads]
    m_vn = res.mass[..., vis_nonsink_group]
    m_vis = m_vs + m_vn
    ratio = torch.where(m_vis > 0, m_vn / m_vis.clamp_min(torch.finfo(m_vis.dtype).tiny), 0.0)
    has_sinks = m_vs > 0 if visual_sink_present is None else visual_sink_present[:, None].expand_as(m_vs)
    return (m_vis >= summ) & (ratio >= rho) & has_sinks


def var_output(
    res: GroupedDecodeResult,
    *,
    sink_group: int,
    vis_nonsink_group: int,
    text_sink_group: int,
    p: float,
    summ: float,
    rho: float,
    visual_sink_present: Tensor | None = None,
) -> Tensor:
    """VAR's redistribution (var.md Step 2-3, closed form): move a fraction `p` of the sink mass to the
    visual non-sink keys, in proportion to their attention, on the selected heads only.

    Args:
        res: op result whose groups include the visual sinks (`sink_group`), the visual non-sinks
            (`vis_nonsink_group`) and the text sinks (`text_sink_group`); other groups are unchanged.
        p: fraction of the (visual and text) sink mass moved, in [0, 1].
        summ: minimum image mass of a selected head, in [0, 1].
        rho: minimum non-sink share of the image mass, in (0, 1].
        visual_sink_present: optional bool [batch]; rows without visual sinks are never edited (D6).

    Returns:
        [batch, heads, head_dim] fp32: c_S * (o_vs + o_ts) + c_VN * o_vn + o_rest, with c_S = 1 - p and
        c_VN = 1 + p * (m_vs + m_ts) / m_vn on selected heads, 1 elsewhere.
    """
    op = "var_output"
    _check_groups(op, res, sink_group=sink_group, vis_nonsink_group=vis_nonsink_group,
                  text_sink_group=text_sink_group)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: `p` must be in [0, 1], got {p}; p is the fraction of sink mass moved.")
    if not 0.0 <= summ <= 1.0:
        raise ValueError(f"{op}: `summ` must be in [0, 1], got {summ}; it is the minimum image mass.")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"{op}: `rho` must be in (0, 1], got {rho}; it is the minimum non-sink ratio.")
    selected = var_selected_heads(res, sink_group=sink_group, vis_nonsink_group=vis_nonsink_group,
                                  summ=summ, rho=rho, visual_sink_present=visual_sink_present)
    m_vs, m_vn, m_ts = (res.mass[..., g] for g in (sink_group, vis_nonsink_group, text_sink_group))
    omega = p * (m_vs + m_ts)
    # a selected head has m_vn / m_vis >= rho > 0, so m_vn > 0; the clamp only guards unselected heads
    sink_coef = torch.where(selected, 1.0 - p, 1.0)  # [batch, heads]
    nonsink_coef = torch.where(selected, 1.0 + omega / m_vn.clamp_min(torch.finfo(m_vn.dtype).tiny), 1.0)
    coef = torch.ones_like(res.mass)  # [batch, heads, groups]
    coef[..., sink_group] = sink_coef
    coef[..., text_sink_group] = sink_coef
    coef[..., vis_nonsink_group] = nonsink_coef
    return (coef[..., None] * res.value).sum(dim=2)


def _top_heads(score: Tensor, count: int) -> Tensor:
    """Bool [batch, heads]: the `count` heads with the largest score in each row."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        chosen.scatter_(1, score.topk(count, dim=1).indices, True)
    return chosen


def gift_output(
    res: GroupedDecodeResult,
    *,
    image_group: int,
    query_group: int,
    beta: float,
    num_heads_kept: int | None = None,
) -> Tensor:
    """GIFT's generation edit (gift.md Step 6, closed form) for the last query row.

    The visual heads (top `num_heads_kept` by image mass) use the multiplied image sums (`mult_*`, from
    `key_multiplier` = M on image keys); the query heads (top `num_heads_kept` by query mass, chosen
    independently) scale the query group by beta * r, with r = e / o pooled over the visual heads of the
    row (r = 1 when o = 0); every edited head is renormalised to sum to 1. Other heads are unchanged.

    Args:
        res: op result computed with `key_multiplier` (M_j on image keys).
        image_group, query_group: the two distinct key groups.
        beta: query-scale factor, > 0 (default in GIFT: 1.0).
        num_heads_kept: heads per set; None means heads // 2.

    Returns:
        [batch, heads, head_dim] fp32.
    """
    op = "gift_output"
    _check_groups(op, res, image_group=image_group, query_group=query_group)
    if res.mult_mass is None or res.mult_value is None:
        raise ValueError(
            f"{op}: the result has no multiplied sums; call grouped_decode_attention with "
            "key_multiplier=M (GIFT's multiplier on image keys)."
        )
    if not beta > 0:
        raise ValueError(f"{op}: `beta` must be > 0, got {beta}; it scales the query-token attention.")
    heads = res.mass.shape[1]
    kept = heads // 2 if num_heads_kept is None else num_heads_kept
    if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= heads:
        raise ValueError(f"{op}: `num_heads_kept` must be an int in [0, {heads}] or None, got {kept!r}.")

    image_mass = res.mass[..., image_group]  # [batch, heads]
    visual_heads = _top_heads(image_mass, kept)
    original = (image_mass * visual_heads).sum(dim=1)  # o: [batch]
    enhanced = (res.mult_mass[..., image_group] * visual_heads).sum(dim=1)  # e: [batch]
    ratio = torch.where(original > 0, enhanced / original.clamp_min(torch.finfo(original.dtype).tiny), 1.0)
    query_heads = _top_heads(res.mass[..., query_group], kept)

    mass = res.mass.clone()  # [batch, heads, groups]
    value = res.value.clone()  # [batch, heads, groups, head_dim]
    mass[..., image_group] = torch.where(visual_heads, res.mult_mass[..., image_group], image_mass)
    value[..., image_group, :] = torch.where(
        visual_heads[..., None], res.mult_value[..., image_group, :], res.value[..., image_group, :]
    )
    query_scale = torch.where(query_heads, beta * ratio[:, None], 1.0)  # [batch, heads]
    mass[..., query_group] = mass[..., query_group] * query_scale
    value[..., query_group, :] = value[..., query_group, :] * query_scale[..., None]
    total = mass.sum(dim=2)  # [batch, heads]
    inv_total = torch.where(total > 0, 1.0 / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    edited_out = value.sum(dim=2) * inv_total[..., None]
    edited = visual_heads | query_heads
    return torch.where(edited[..., None], edited_out, plain_output(res))


def scale_heads(out: Tensor, scale: Tensor) -> Tensor:
    """VHR's head-output scale before `o_proj`: out [batch, heads, head_dim] * scale [batch, heads]."""
    if out.dim() != 3 or tuple(scale.shape) != tuple(out.shape[:2]):
        raise ValueError(
            f"scale_heads: `scale` must be [batch, heads] = {tuple(out.shape[:2])} for `out` of shape "
            f"[batch, heads, head_dim], got scale {tuple(scale.shape)} and out {tuple(out.shape)}."
        )
    return out * scale[..., None].to(out.dtype)
