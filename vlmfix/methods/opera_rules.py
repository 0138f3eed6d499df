"""OPERA's scoring and retrospection rules as pure functions (spec opera.md §3.3-§3.5), used by the beam
search in `vlmfix.decoding.opera` and tested on hand-built tensors.

Vocabulary: a beam has generated tokens 0 … t-1; the candidate is token t. Its local matrix A is
(t+1)×(t+1), lower-triangular: row i holds the attention of generated token i over the generated tokens
0 … i (last layer, max over heads, renormalised over every visible key); row t is the candidate's.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor

SCORE_FACTOR = 1e-7  # phi = 1e-7 * column product (U L3424-3428)
FLOAT16_TINY = 2.0**-24  # the smallest positive float16: smaller scores flush to 0 in the official code
FLOAT16_MAX = 65504.0  # the largest float16: larger scores become inf (a veto) in the official code
SCORE_RANGES = ("float16", "exact")


def column_scores(matrix: Tensor, scale: float, score_range: str = "float16") -> tuple[Tensor, Tensor]:
    """The over-trust score phi and its column c* for each local matrix.

    phi_c = 1e-7 * prod_{i=c..t} scale * A[i, c] (the diagonal and the candidate row included), computed as a
    sum of logs in fp32; phi = max_c phi_c, c* = argmax_c (ties: the first column).
    `score_range="float16"` keeps the official code's float16 range: phi_c < 2^-24 is 0 and phi_c > 65504 is
    inf; "exact" keeps the fp32 value (inf only beyond fp32's range) and picks c* in log space.

    Args:
        matrix: [..., n, n] fp32, lower-triangular (entries above the diagonal are ignored).
    Returns:
        phi: [...] fp32; location: [...] long, the column index in 0 … n-1.
    """
    n = matrix.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=matrix.device).tril()
    logs = torch.log(scale * matrix.float()).masked_fill(~lower, 0.0)  # above the diagonal: outside the product
    log_phi = math.log(SCORE_FACTOR) + logs.sum(dim=-2)  # [..., n]: column c sums rows c … n-1
    if score_range == "exact":
        best, location = log_phi.max(dim=-1)
        return best.exp(), location
    phi = log_phi.exp()
    phi = phi.masked_fill(phi < FLOAT16_TINY, 0.0).masked_fill(phi > FLOAT16_MAX, math.inf)
    return phi.max(dim=-1).values, phi.argmax(dim=-1)


def local_scores(
    rows: Tensor, candidate: Tensor, scale: float, window: int, score_range: str = "float16"
) -> tuple[Tensor, Tensor]:
    """phi and the absolute location c* of candidates, over the last `window` generated tokens (spec §3.2-3.3).

    Args:
        rows: [..., n, n+1] the beam's stored rows 0 … n-1 (row i over tokens 0 … i, zero beyond).
        candidate: [..., n+1] the candidate's row over tokens 0 … n (itself last).
    Returns:
        phi [...] and location [...] (a generated position in 0 … n).
    """
    matrix = torch.cat([rows, candidate[..., None, :]], dim=-2)  # [..., n+1, n+1]
    start = max(0, matrix.shape[-1] - window)
    phi, location = column_scores(matrix[..., start:, start:], scale, score_range)
    return phi, location + start


def mode(values: Tensor, size: int) -> Tensor:
    """The most frequent value along the last dim of `values` (ints in 0 … size-1); ties: the smallest."""
    counts = torch.zeros(*values.shape[:-1], size, device=values.device)
    counts.scatter_add_(-1, values, torch.ones_like(values, dtype=counts.dtype))
    return counts.argmax(dim=-1)


@dataclass(frozen=True)
class RetrospectionRule:
    """When and where an item rolls back (spec §3.5): `threshold` r, `min_location` 10, `max_attempts` C
    rollbacks per position, `window` W."""

    threshold: int
    max_attempts: int
    window: int
    min_location: int = 10


def rollback_position(
    histories: Tensor, location: int, generated: int, attempts: MutableMapping[int, int], rule: RetrospectionRule
) -> int | None:
    """The generated position to re-decide, or None (no rollback); counts the attempt in `attempts`.

    Args:
        histories: [beams, steps] long, each beam's summary-token locations (-1 where none was computed).
        location: the item's location this step (the mode over its beams).
        generated: the item's generated length, this step's token included (n = t + 1).
        attempts: rollbacks so far per position (updated).
    Triggers when `location >= min_location` and every beam saw `location` more than `threshold` times.
    The position is location + 1, or location when that position already had `max_attempts` rollbacks
    (None when both had, or when it is not in 1 … n-1); a position more than `window + 1` tokens back moves
    to n - window - 1.
    """
    if location < rule.min_location:
        return None
    counts = (histories == location).sum(dim=-1)  # [beams]
    if not bool((counts > rule.threshold).all()):
        return None
    position = location + 1
    if attempts.get(position, 0) >= rule.max_attempts:
        position -= 1
        if attempts.get(position, 0) >= rule.max_attempts:
            return None
    if position >= generated or position < 1:  # nothing decided yet there / token 0 (decided from the prefill)
        return None
    attempts[position] = attempts.get(position, 0) + 1
    if generated - position > rule.window + 1:
        position = max(1, generated - rule.window - 1)
    return position
