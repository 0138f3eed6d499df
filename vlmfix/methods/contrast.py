"""Logit-contrast rules of the two-stream methods: VCD's and DCD's contrast with the adaptive
plausibility constraint, and PAI's cutoff (`plausible`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlmfix import validation


def plausible(reference_logits: Tensor, beta: float) -> Tensor:
    """[B, vocab] bool: tokens j with p(j) >= beta * max p under `reference_logits` (logit space:
    l_j >= log(beta) + max l); the adaptive plausibility constraint of VCD/DCD and PAI's cutoff."""
    # reference_logits: [B, vocab] (logits or log-probs: the test is shift-invariant)
    top = reference_logits.max(dim=-1, keepdim=True).values
    return reference_logits >= top + torch.log(torch.tensor(beta, dtype=reference_logits.dtype))


def contrast_logits(positive: Tensor, negative: Tensor, alpha: float, apc_beta: float | None) -> Tensor:
    """(1 + alpha) * positive - alpha * negative, with -inf where the positive stream finds a token
    implausible (`plausible(positive, apc_beta)`; `apc_beta=None` switches the cutoff off).

    positive, negative: [B, vocab] logits; returns [B, vocab] fp32 scores (inputs are not modified).
    """
    positive, negative = positive.float(), negative.float()
    scores = (1.0 + alpha) * positive - alpha * negative
    if apc_beta is not None:
        scores = scores.masked_fill(~plausible(positive, apc_beta), float("-inf"))
    return scores


def count_changed_tops(scores: Tensor, positive: Tensor, counts: list[int]) -> None:
    """Add 1 to `counts[row]` for every row whose best combined score is not the positive stream's top token
    (the steps where the contrast decided something greedy would not have).

    scores, positive: [B, vocab]; counts: B ints, updated in place."""
    changed = scores.argmax(dim=-1) != positive.argmax(dim=-1)  # [B]
    for row in changed.nonzero().flatten().tolist():
        counts[row] += 1


def check_alpha(alpha: Any) -> float:
    """A contrast strength: a finite number >= 0."""
    return validation.number(alpha, "alpha", low=0, meaning="the contrast strength (0 = plain decoding of the "
                             "positive stream)")


def check_beta(beta: Any, name: str) -> float | None:
    """The plausibility cutoff: None (off) or a number in (0, 1]."""
    return validation.optional_number(beta, name, low=0, high=1, low_open=True, meaning=f"the cutoff keeping "
                                      f"tokens with p >= {name} * max p under the positive stream (None = off)")
