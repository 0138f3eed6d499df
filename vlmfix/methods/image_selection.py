"""Image-token selection from the language model's own attention, shared by SID and AvisC.

Scores: the attention of a layer's newest query row (the prompt's last token at the prefill, the fed
token at a decode step) over all visible keys, averaged over heads, fp32. It is computed inside
vlmfix's attention function by an observer (`NewestRowAttention`) from the layer's query and keys,
so the model keeps its fast backend and no `output_attentions` is needed.

Selections are per batch row over that row's image tokens (a [batch, seq] bool `image` mask):
- `least_attended` / `most_attended`: the k image tokens with the smallest / largest score, ties going
  to the lower position (SID keeps the least attended ones);
- `above_mean_std`: the image tokens scoring at least mean + lamb * std over the row's image tokens
  (AvisC's "blind" tokens);
- `top_p_layers`: per row, the fewest layers (by image-attention mass, largest first) whose normalised
  masses reach `gamma` (AvisC's layer choice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import additive_mask, key_probabilities, repeat_kv

# rows(call) -> the rows of the call to read (None: skip this call)
RowPicker = Callable[[AttentionCall], slice | None]


def newest_row_attention(call: AttentionCall, rows: slice) -> Tensor:
    """[rows, kv_len] fp32: the head-mean softmax of the newest query row of `call` over every visible key
    (masked keys get 0; each head's attention sink, where the layer has one, in the denominator), for the batch
    rows `rows`."""
    query = call.query[rows, :, -1:]  # [rows, heads, 1, head_dim]
    heads = query.shape[1]
    key = repeat_kv(call.key[rows], heads)  # [rows, heads, kv_len, head_dim]
    scaling = query.shape[-1] ** -0.5 if call.scaling is None else call.scaling
    z = (query.float() @ key.float().transpose(-1, -2)) * scaling  # [rows, heads, 1, kv_len]
    mask = call.attention_mask
    if mask is not None:
        mask = mask[rows, :, -1:, :] if mask.dim() == 4 else mask[rows]  # 4-D, or a 2-D padding mask (flash)
    z = z + additive_mask(mask, z.shape[0], 1, key.shape[2], z.device)
    return key_probabilities(z, call.sinks).mean(dim=1)[:, 0]  # a sink (HY V4 VL) takes its share


@dataclass
class NewestRowAttention:
    """Observer: the newest query row's head-mean attention of chosen layers, for the rows `rows(call)`
    picks (install it with `session.observe_for_prompt` or `session.observing`).

    `scores[layer]` holds the latest call's [rows, kv_len]; `on_scores(layer, scores)`, when given, runs
    right after (inside the forward, before the next layer), e.g. to select the keys the next layers edit.
    """

    layers: frozenset[int] | None  # None: every layer
    rows: RowPicker
    on_scores: Callable[[int, Tensor], None] | None = None
    scores: dict[int, Tensor] = field(default_factory=dict)

    def __call__(self, call: AttentionCall) -> None:
        if self.layers is not None and call.layer_idx not in self.layers:
            return None
        rows = self.rows(call)
        if rows is None:
            return None
        scores = newest_row_attention(call, rows)
        self.scores[call.layer_idx] = scores
        if self.on_scores is not None:
            self.on_scores(call.layer_idx, scores)
        return None


def all_rows(call: AttentionCall) -> slice:
    return slice(None)


def _ranked(scores: Tensor, image: Tensor, descending: bool) -> Tensor:
    """[batch, seq] long: each image position's rank among its row's image tokens (0 = first chosen),
    ties broken towards the lower position; non-image positions rank after every image token."""
    fill = -math.inf if descending else math.inf
    keyed = scores.float().masked_fill(~image, fill)
    order = torch.sort(keyed, dim=-1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def least_attended(scores: Tensor, image: Tensor, count: Tensor) -> Tensor:
    """[batch, seq] bool: per row, the `count[b]` image positions with the smallest scores.

    scores: [batch, seq] (positions beyond `image`'s width are ignored); image: [batch, seq] bool;
    count: [batch] long (at most the row's image tokens).
    """
    scores = scores[:, : image.shape[1]]
    return image & (_ranked(scores, image, descending=False) < count[:, None])


def most_attended(scores: Tensor, image: Tensor, count: Tensor) -> Tensor:
    """[batch, seq] bool: per row, the `count[b]` image positions with the largest scores (ties: lower position)."""
    scores = scores[:, : image.shape[1]]
    return image & (_ranked(scores, image, descending=True) < count[:, None])


def above_mean_std(scores: Tensor, image: Tensor, lamb: float) -> Tensor:
    """[batch, seq] bool: image positions scoring >= mean + lamb * std of the row's image scores
    (unbiased std; a row with a single image token keeps it)."""
    scores = scores[:, : image.shape[1]].float()
    count = image.sum(dim=1, keepdim=True).clamp_min(1)  # [batch, 1]
    masked = scores.masked_fill(~image, 0.0)
    mean = masked.sum(dim=1, keepdim=True) / count
    spread = ((scores - mean).masked_fill(~image, 0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)
    return image & (scores >= mean + lamb * spread.sqrt())


def top_p_layers(mass: Tensor, gamma: float) -> Tensor:
    """[batch, layers] bool: per row, the k layers with the largest image mass, k = 1 + the number of
    layers whose cumulative normalised mass (largest first) stays below `gamma`. mass: [batch, layers]."""
    share = mass.float() / mass.float().sum(dim=1, keepdim=True).clamp_min(1e-30)
    order = torch.sort(share, dim=1, descending=True, stable=True)
    count = (order.values.cumsum(dim=1) < gamma).sum(dim=1) + 1  # [batch]
    chosen = torch.zeros_like(share, dtype=torch.bool)
    rank = torch.arange(share.shape[1], device=share.device).expand_as(share)
    chosen.scatter_(1, order.indices, rank < count[:, None])
    return chosen


def keep_counts(image: Tensor, ratio: float | None, count: int | None) -> Tensor:
    """[batch] long: `count` (clipped to each row's image tokens) or round(ratio * image tokens), half up."""
    tokens = image.sum(dim=1)
    if count is not None:
        return tokens.clamp(max=count)
    assert ratio is not None  # one of the two is always given
    return torch.floor(tokens.double() * ratio + 0.5).long().clamp(max=tokens)


def image_indices(selected: Tensor, image: Tensor) -> list[list[int]]:
    """Per row, the indices (0-based, in the row's image-token order) of the selected image tokens."""
    out = []
    for row_selected, row_image in zip(selected, image):
        out.append(row_selected[row_image].nonzero().flatten().tolist())
    return out


def rows_without_context_before_image(image: Tensor, valid: Tensor) -> list[int]:
    """The rows in which no real token precedes the first image token (a key mask on image keys could
    then leave a query row with nothing to attend to)."""
    positions = torch.arange(image.shape[1], device=image.device).expand_as(image)
    first = torch.where(image, positions, image.shape[1]).min(dim=1).values  # [batch]
    before = valid & ~image & (positions < first[:, None])
    return (~before.any(dim=1) & image.any(dim=1)).nonzero().flatten().tolist()
