"""Logit-contrast rules of the two-stream methods: VCD's and DCD's contrast with the adaptive
plausibility constraint, and PAI's cutoff (`plausible`)."""

from __future__ import annotations

import torch
from torch import Tensor


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
