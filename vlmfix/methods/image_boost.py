"""PAI's image-key boost, shared by `PAI` and `DualStream`: the margin check, the boosted layer band, the
first boosted row, and the per-prompt state that serves the same `KeyBias` in every boosted layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.edits import KeyBias

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

    def edits(self, layer_idx: int) -> tuple[KeyBias, ...]:
        return (self.edit,) if self.edit is not None and layer_idx in self.layers else ()
