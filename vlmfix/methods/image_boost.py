"""PAI's image-key boost, shared by `PAI` and `DualStream`: the margin check, the boosted layer band, the
first boosted row, and the per-prompt state that serves the same `KeyBias` in every boosted layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.edits import (
    KeyBias,
    additive_mask,
    attention_scores,
    key_biased_scores,
    key_probabilities,
    row_mask,
)

FIRST_BOOSTED_LAYER = 2  # PAI leaves the first two language-model layers alone


def pai_band(num_layers: int) -> tuple[int, ...]:
    """PAI's boosted layers: 2 .. num_layers - 1."""
    return tuple(range(min(FIRST_BOOSTED_LAYER, num_layers), num_layers))


def check_margin(value: Any, name: str) -> float:
    """A boost margin: a finite number >= 0."""
    return validation.number(value, name, low=0, meaning=f"the PAI margin in z + {name}*|z| (0 = no boost)")


def first_token_start(input_ids: Tensor, skip_first_token: bool) -> Tensor | None:
    """`from_position` for the boost: None (boost the prompt's last row, i.e. the first generated token)
    or the prompt length (boost decode steps only, as PAI's code does when CFG is on)."""
    if not skip_first_token:
        return None
    # input_ids: [batch, seq]
    return torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)


@dataclass
class BoostState:
    """One prompt batch's boost: the same `KeyBias` in every boosted layer."""

    edit: KeyBias | None
    layers: frozenset[int]
    info: dict[str, Any] = field(default_factory=dict)
    recorder: GainRecorder | None = None  # `record=True`: PAI's image-attention gain

    def edits(self, layer_idx: int) -> tuple[KeyBias, ...]:
        return (self.edit,) if self.edit is not None and layer_idx in self.layers else ()


class GainRecorder:
    """`record=True`: how much the boost multiplies the newest query's attention to each image key, averaged over
    the boosted layers, heads and steps (p_boosted / p_plain; 1 = unchanged, also for a key the layer's mask hides
    from the query, e.g. outside a sliding window), from the observed query and keys.

    The boosted scores come from the edits the state serves for the layer, through the edit path's own pre-softmax
    stage (`key_biased_scores`), and the rows it boosts from the edit path's own `row_mask`: the recorded gain is that
    of the boost applied, rows and steps it skips included. The sums stay on the model's device until `report`."""

    def __init__(self, image: Tensor, state: BoostState) -> None:
        self.image = image  # [batch, seq] bool: the prompt's image tokens
        self.state = state
        self.total: Tensor | None = None  # [batch, seq] fp32 summed gains, on the device of the observed calls
        self.counts: Tensor | None = None  # [batch] boosted (layer, step) calls per row

    def observe(self, call: Any, rows_of_prompt: Any) -> None:
        edits = self.state.edits(call.layer_idx)
        if not edits:
            return
        batch, seq = self.image.shape
        query = rows_of_prompt(call.query)[:, :, -1:]  # [batch, heads, 1, head_dim]: the newest row
        if query.shape[0] != batch:
            return
        key = rows_of_prompt(call.key)  # [batch, kv_heads, kv_len, head_dim]
        kv_len, device = key.shape[2], query.device
        if self.total is None or self.counts is None:
            self.image = self.image.to(device)
            self.total = torch.zeros(self.image.shape, dtype=torch.float32, device=device)
            self.counts = torch.zeros(batch, dtype=torch.float32, device=device)
        z = attention_scores(query, key, call.scaling, call.softcap)  # [batch, heads, 1, kv_len]
        boosted = key_biased_scores(z, edits)
        # None (causal), [batch, kv_len] padding, or [batch or 1, 1 or heads (MiniMax M3's blocks), q_len, kv_len]
        mask = call.attention_mask
        if mask is not None and mask.shape[0] > batch:
            mask = mask[:batch]
        if mask is not None and mask.dim() == 4:
            mask = mask[..., -1:, :]
        mask = additive_mask(mask, batch, 1, kv_len, device)
        plain_p, boosted_p = key_probabilities(z + mask, call.sinks), key_probabilities(boosted + mask, call.sinks)
        # a key the mask hides (a sliding window's older keys) keeps its zero attention: gain 1, not 0 / 0
        visible = torch.isfinite(mask).expand(batch, -1, 1, kv_len)  # [batch, 1 or heads, 1, kv_len]
        ratio = torch.where(visible, boosted_p / plain_p.clamp_min(1e-30), torch.ones_like(boosted_p))
        gain = ratio.mean(dim=1)[:, 0]  # [batch, kv_len]
        rows = row_mask(edits[0], batch, 1, kv_len, device)[:, 0]  # [batch] bool: rows whose newest query it edits
        width = min(seq, kv_len)
        self.total[:, :width] += gain[:, :width] * (self.image[:, :width] & rows[:, None])
        self.counts += rows

    def report(self) -> list[list[float]]:
        """Per row, in the row's image-token order: the mean gain of each image token (empty before any boost)."""
        if self.total is None or self.counts is None:
            return [[] for _ in range(self.image.shape[0])]
        counts, image = self.counts.cpu(), self.image.cpu()
        mean = (self.total.cpu() / counts.clamp_min(1)[:, None]).double()
        return [mean[b][image[b]].tolist() if counts[b] else [] for b in range(image.shape[0])]
