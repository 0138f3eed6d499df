"""PAI's image-key boost, shared by `PAI` and `DualStream`: argument checks, the boosted layer band, the
first boosted row, and the per-prompt state that serves the same `KeyBias` in every boosted layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmfix.decoding.edits import KeyBias

FIRST_BOOSTED_LAYER = 2  # PAI leaves the first two language-model layers alone


def check_layers(layers: Sequence[int] | None, name: str = "layers") -> tuple[int, ...] | None:
    """Constructor check: `None` (the method's default band) or distinct non-negative layer indices."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in layers
    ):
        raise ValueError(f"`{name}` must be a list of layer indices (ints) or None, got {layers!r}.")
    values = tuple(int(x) for x in layers)
    if any(x < 0 for x in values) or len(set(values)) != len(values):
        raise ValueError(f"`{name}` must hold distinct non-negative layer indices, got {list(values)}.")
    return values


def resolve_layers(layers: Sequence[int] | None, num_layers: int, name: str = "layers",
                   default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The edited layers for a model of `num_layers`: `layers` checked against the depth, or `default`
    when None (itself defaulting to PAI's band, 2 .. num_layers - 1)."""
    if layers is None:
        return default if default is not None else tuple(range(min(FIRST_BOOSTED_LAYER, num_layers), num_layers))
    bad = [x for x in layers if x >= num_layers]
    if bad:
        raise ValueError(
            f"`{name}` holds {bad}, but the language model has {num_layers} layers (0 .. {num_layers - 1}); "
            f"pass indices below {num_layers} or None for the default."
        )
    return tuple(sorted(layers))


def check_fraction(value: float, name: str, meaning: str, *, low_open: bool = False) -> float:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}; {name} is {meaning}.")
    return float(value)


def check_margin(value: float, name: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0, got {value!r}; it is the PAI margin in z + {name}*|z| "
            f"(0 = no boost)."
        )
    return float(value)


def check_gamma(value: float) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ValueError(
            f"`gamma` must be a finite number >= 1, got {value!r}; gamma is the image-free refinement "
            f"strength (1 = scores of the image stream only, PAI uses 1.1). Use cfg=False to turn the "
            f"refinement off."
        )
    return float(value)


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
