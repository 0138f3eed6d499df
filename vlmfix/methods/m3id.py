"""M3ID: contrast with the image-free stream under a weight that grows with every generated token."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.contrastive import require_engine
from vlmfix.decoding.method import register_method
from vlmfix.methods.contrast import check_beta, count_changed_tops
from vlmfix.methods.image_free import ImageFreeRefinement, image_free_scores

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

# lambda * max_new_tokens above this (w > e^4 - 1 = 53.6 at the last token) gets the long-output warning
LONG_OUTPUT_EXPONENT = 4.0
# exp(lambda * t) is held at exp(80) (~5.5e34, inside fp32's range): far beyond that the scores are already the
# pointwise-mutual-information argmax, and a larger weight would overflow the scores to inf / nan
MAX_EXPONENT = 80.0


def m3id_weight(step: int, lambda_: float, t_offset: int = 1, max_weight: float | None = None) -> float:
    """w_t = exp(lambda * t) - 1 with t = step + t_offset (`step`: tokens generated before this one), capped at
    `max_weight` when given."""
    weight = math.expm1(min(lambda_ * (step + t_offset), MAX_EXPONENT))
    return weight if max_weight is None else min(weight, max_weight)


@dataclass
class M3IDState:
    """Per call: each step's weight, and per batch row how often the confidence gate skipped the correction and
    how often the combined scores chose another top token than the image stream alone."""

    rows: int
    weights: list[float] = field(default_factory=list)
    gated: list[int] = field(default_factory=list)
    changed_top_token: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gated = [0] * self.rows
        self.changed_top_token = [0] * self.rows


@register_method
class M3ID(ImageFreeRefinement):
    """Multi-Modal Mutual-Information Decoding: score each token by lc + w_t * (lc - lu), where lc and lu are
    the log-probabilities with and without the image and w_t = exp(lambda * t) - 1 grows with the number of
    generated tokens t, keeping only tokens plausible under the image.

    The image-free stream is PAI's (the same prompts with the image span deleted, rows B..2B-1 of one batched
    forward, see `vlmfix.methods.image_free`); the rule is PAI's refinement with the strength 1 + w_t at step t.
    It applies in every decoding mode (greedy, sampling, beams).

    Args:
        lambda_ (float, default 0.02): growth rate of the weight (>= 0; 0 = plain decoding of the image stream).
        t_offset (int, default 1): t of the first generated token (1: w = 0.0202 at the first token, as AvisC's
            re-implementation; 0: w = 0 there, as RITUAL's).
        apc_beta (float | None, default 0.1): plausibility cutoff in (0, 1] on the image stream: tokens with
            p(j | image) < apc_beta * max p are removed; None switches it off.
        max_weight (float | None, default None): cap on w_t (None: unbounded, as the re-implementations). With
            no cap, `lambda_ * max_new_tokens > 4` warns: long answers then reduce to the token with the highest
            log p(image) - log p(no image) inside the plausible set.
        confidence_gate (float | None, default None): in (0, 1]; rows whose top image-stream probability is at
            least this get w = 0 at that step (no correction where the model is sure). None: no gate.

    Paper: Favero et al., "Multi-Modal Hallucination Control by Visual Information Grounding", CVPR 2024,
    arXiv 2403.14003 (the mutual-information rule with gamma_t = exp(-lambda t), w_t = (1 - gamma_t) / gamma_t).
    The M3ID+DPO fine-tune of the paper is not offered. No official code was found: vlmfix follows the
    re-implementations inside sangminwoo/AvisC and sangminwoo/RITUAL (spec m3id.md).
    Departs from those: batched (they flatten the batch to one prompt), greedy and beams apply the rule too (they
    only patched sampling), the whole image span is removed (not only the placeholder), the weight can be capped,
    and w_t is held below exp(80) so the fp32 scores stay finite.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.M3ID(lambda_=0.02)], max_new_tokens=24)
    """

    name = "m3id"
    needs_image = True
    cfg = True  # the image-free stream is always on

    def __init__(
        self,
        lambda_: float = 0.02,
        *,
        t_offset: int = 1,
        apc_beta: float | None = 0.1,
        max_weight: float | None = None,
        confidence_gate: float | None = None,
    ) -> None:
        self.lambda_ = validation.number(lambda_, "lambda_", low=0, meaning="the growth rate of the weight "
                                         "w_t = exp(lambda_ * t) - 1 (0 = plain decoding; M3ID uses 0.02)")
        self.t_offset = validation.number(t_offset, "t_offset", low=0, integer=True,
                                          meaning="t of the first generated token (1 as AvisC's code, 0 as RITUAL's)")
        self.apc_beta = check_beta(apc_beta, "apc_beta")
        self.max_weight = validation.optional_number(max_weight, "max_weight", low=0,
                                                     meaning="the cap on w_t (None = unbounded)")
        self.confidence_gate = validation.optional_number(
            confidence_gate, "confidence_gate", low=0, high=1, low_open=True,
            meaning="the top image-stream probability from which a row gets no correction (None = no gate)",
        )

    def weight(self, step: int) -> float:
        """w_t at the step with `step` tokens generated before it."""
        return m3id_weight(step, self.lambda_, self.t_offset, self.max_weight)

    def prepare(self, session: Session) -> M3IDState:
        require_engine(session, self)
        self._warn_long_output(planned_new_tokens(session))
        return M3IDState(rows=session.inputs["input_ids"].shape[0])

    def _warn_long_output(self, new_tokens: int | None) -> None:
        if self.max_weight is not None or new_tokens is None or self.lambda_ * new_tokens <= LONG_OUTPUT_EXPONENT:
            return
        last = self.weight(new_tokens - 1)
        warnings.warn(
            f"M3ID with lambda_={self.lambda_:g} and max_new_tokens={new_tokens}: the weight reaches w = {last:.3g} "
            f"by the last token (lambda_ * max_new_tokens = {self.lambda_ * new_tokens:.1f} > 4), so long answers "
            "reduce to picking the token with the highest log p(image) - log p(no image). Cap it with "
            "M3ID(max_weight=...), or report answer length and repetition beside the results.",
            stacklevel=3,
        )

    def combine(self, state: M3IDState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        # positive_logits, negative_logits: [B, vocab]
        weight = self.weight(step)
        state.weights.append(weight)
        gamma: float | Tensor = 1.0 + weight
        if self.confidence_gate is not None:
            top = torch.softmax(positive_logits.float(), dim=-1).max(dim=-1, keepdim=True).values  # [B, 1]
            sure = top >= self.confidence_gate
            gamma = torch.where(sure, 1.0, torch.full_like(top, 1.0 + weight))
            for row in sure.flatten().nonzero().flatten().tolist():
                state.gated[row] += 1
        scores = image_free_scores(positive_logits, negative_logits, gamma, self.apc_beta)
        count_changed_tops(scores, positive_logits, state.changed_top_token)
        return scores

    def report(self, state: M3IDState) -> dict[str, Any]:
        """The settings, each step's weight, and per row the gated steps and the steps whose top token the
        correction changed (0 everywhere: the rule decided nothing)."""
        return {
            "lambda_": self.lambda_, "t_offset": self.t_offset, "apc_beta": self.apc_beta,
            "max_weight": self.max_weight, "confidence_gate": self.confidence_gate,
            "weights": list(state.weights), "gated_steps": list(state.gated),
            "changed_top_token": list(state.changed_top_token),
        }


def planned_new_tokens(session: Session) -> int | None:
    """The call's `max_new_tokens` (from its generate arguments, else its or the model's generation config, else
    `max_length` minus the prompt length); None when unknown."""
    inputs = session.call_inputs
    if isinstance(inputs.get("max_new_tokens"), int):
        return int(inputs["max_new_tokens"])
    config = inputs.get("generation_config") or getattr(session.model, "generation_config", None)
    new_tokens = getattr(config, "max_new_tokens", None)
    if isinstance(new_tokens, int):
        return new_tokens
    max_length = inputs.get("max_length", getattr(config, "max_length", None))
    if isinstance(max_length, int):
        return max(max_length - session.inputs["input_ids"].shape[1], 0)
    return None
