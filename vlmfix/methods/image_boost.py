"""PAI's image-key boost, shared by `PAI` and `DualStream`: the margin check, the boosted layer band, the
first boosted row, and the per-prompt state that serves the same `KeyBias` in every boosted layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.edits import KeyBias, additive_mask

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
    the boosted layers, heads and steps (p_boosted / p_plain; 1 = unchanged), from the observed query and keys."""

    def __init__(self, image: Tensor, alpha: float, layers: frozenset[int], first_token: bool) -> None:
        self.image = image  # [batch, seq] bool: the prompt's image tokens
        self.alpha, self.layers, self.first_token = alpha, layers, first_token
        self.total = torch.zeros(image.shape, dtype=torch.float64)  # [batch, seq] summed gains
        self.calls = 0

    def observe(self, call: Any, rows_of_prompt: Any) -> None:
        if call.layer_idx not in self.layers or (call.query.shape[2] > 1 and not self.first_token):
            return
        batch, seq = self.image.shape
        query = rows_of_prompt(call.query)[:, :, -1:].float()  # [batch, heads, 1, head_dim]
        if query.shape[0] != batch:
            return
        key = rows_of_prompt(call.key).float()  # [batch, kv_heads, kv_len, head_dim]
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        kv_len = key.shape[2]
        scaling = call.scaling if call.scaling is not None else query.shape[-1] ** -0.5
        z = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [batch, heads, 1, kv_len]
        mask = call.attention_mask  # None (causal), [batch, kv_len] padding, or [batch or 1, 1, q_len, kv_len]
        if mask is not None and mask.shape[0] > batch:
            mask = mask[:batch]
        if mask is not None and mask.dim() == 4:
            mask = mask[..., -1:, :]
        z_masked = z + additive_mask(mask, batch, 1, kv_len, z.device)
        on_image = torch.zeros(batch, kv_len, dtype=torch.bool, device=z.device)
        on_image[:, : min(seq, kv_len)] = self.image[:, :kv_len].to(z.device)
        boosted = z_masked + self.alpha * z.abs() * on_image[:, None, None, :]
        plain_p, boosted_p = torch.softmax(z_masked, -1), torch.softmax(boosted, -1)
        gain = (boosted_p / plain_p.clamp_min(1e-30)).mean(dim=1)[:, 0]  # [batch, kv_len]
        self.total[:, : min(seq, kv_len)] += gain[:, :seq].double().cpu() * self.image[:, :kv_len].cpu()
        self.calls += 1

    def report(self) -> list[list[float]]:
        """Per row, in the row's image-token order: the mean gain of each image token (empty before any call)."""
        if not self.calls:
            return [[] for _ in range(self.image.shape[0])]
        mean = self.total / self.calls
        return [mean[b][self.image[b].cpu()].tolist() for b in range(self.image.shape[0])]
