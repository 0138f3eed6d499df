"""PAI's image-free refinement, shared by `PAI` and `DualStream`: the same prompts without their image
tokens decoded as the second stream of the two-stream engine, and the score rule that contrasts them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.contrastive import ContrastiveMethod, require_engine
from vlmfix.decoding.prompt_inputs import pad_token_id
from vlmfix.methods.contrast import plausible

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session


def image_free_scores(
    positive_logits: Tensor, negative_logits: Tensor, gamma: float | Tensor, cutoff: float | None
) -> Tensor:
    """PAI's refinement: gamma * (log p_img - log p_noimg) + log p_noimg, with tokens whose image-stream
    probability is below `cutoff` times the top one set to -inf (`cutoff=None`: no cutoff).

    positive_logits, negative_logits: [batch, vocab] raw next-token logits of the image and image-free
    streams; gamma: one strength, or [batch, 1] per row (M3ID's schedule; rows at 1 keep log p_img
    exactly); returns [batch, vocab] fp32 scores.
    """
    if positive_logits.shape != negative_logits.shape:
        raise ValueError(
            f"the image stream's logits {tuple(positive_logits.shape)} and the image-free stream's "
            f"{tuple(negative_logits.shape)} must have the same shape [batch, vocab]."
        )
    log_img = torch.log_softmax(positive_logits.float(), dim=-1)
    log_free = torch.log_softmax(negative_logits.float(), dim=-1)
    if isinstance(gamma, Tensor):
        scores = torch.where(gamma == 1.0, log_img, gamma * (log_img - log_free) + log_free)
    else:
        scores = log_img if gamma == 1.0 else gamma * (log_img - log_free) + log_free
    if cutoff is None:
        return scores
    return scores.masked_fill(~plausible(log_img, cutoff), -math.inf)


def check_refinement(cfg: Any, gamma: Any, plausibility: Any) -> tuple[bool, float, float]:
    """The refinement's switch, strength and cutoff, checked."""
    return (
        validation.boolean(cfg, "cfg", "the switch of the image-free refinement"),
        validation.number(gamma, "gamma", low=1, meaning="the image-free refinement strength (1 = scores of the "
                          "image stream only, PAI uses 1.1); use cfg=False to turn the refinement off"),
        validation.number(plausibility, "plausibility", low=0, high=1, low_open=True,
                          meaning="the refinement's cutoff relative to the top image-stream probability"),
    )


class ImageFreeRefinement(ContrastiveMethod):
    """PAI's optional refinement against the same prompts without their image tokens, decoded as the
    second stream of the contrastive engine (rows B..2B-1, unedited). Subclasses set `cfg`, `gamma`,
    `plausibility`; with `cfg=False` the method is a plain (single-stream) attention method."""

    cfg: bool
    gamma: float
    plausibility: float

    @property
    def contrastive(self) -> bool:  # type: ignore[override]  # per instance: only with the refinement on
        return self.cfg

    def require_stream_engine(self, session: Session) -> None:
        if self.cfg:
            require_engine(session, self)

    def negative_inputs(self, session: Session, state: Any) -> dict[str, Any]:
        """The same prompts with their image tokens (and Qwen's vision start/end) removed, re-left-padded."""
        adapter = session.adapter
        pad = pad_token_id(session.tokenizer, session.model, adapter.text_config, avoid=adapter.image_token_id)
        return adapter.without_image(session.inputs, pad)

    def combine(self, state: Any, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        return image_free_scores(positive_logits, negative_logits, self.gamma, self.plausibility)
