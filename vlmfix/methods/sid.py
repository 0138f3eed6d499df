"""SID: contrast with a negative stream that sees only the least-attended image tokens after an early layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.contrastive import ContrastiveMethod, negative_rows, require_engine
from vlmfix.decoding.edits import Edit, KeyBias
from vlmfix.decoding.method import register_method
from vlmfix.errors import UnsupportedModelError
from vlmfix.methods.contrast import check_alpha, check_beta, contrast_logits
from vlmfix.methods.image_selection import (
    NewestRowAttention,
    image_indices,
    keep_counts,
    least_attended,
    rows_without_context_before_image,
)

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session

Reselect = Literal["every_step", "prefill_only"]
RESELECT: tuple[Reselect, ...] = ("every_step", "prefill_only")
POPE_KEEP_RATIO = 0.174  # ~100/576: the official POPE script keeps 100 of LLaVA-1.5's 576 image tokens
CHAIR_KEEP_RATIO = 0.087  # ~50/576: the official CHAIR script keeps 50


def is_greedy(session: Session) -> bool:
    """Whether the running generate call picks tokens by argmax (no sampling, one beam)."""
    config = session.call_inputs.get("generation_config") or session.model.generation_config
    sample = session.call_inputs.get("do_sample", getattr(config, "do_sample", False))
    beams = session.call_inputs.get("num_beams", getattr(config, "num_beams", 1))
    return not sample and (beams or 1) == 1


@dataclass
class SIDState:
    """Per call: the image tokens, how many each row keeps, and the current selection (refreshed by the
    layer-(K-1) observer at every two-stream forward, or at the prefill only)."""

    image: Tensor  # [B, S] bool, the prompt's image tokens
    keep: Tensor  # [B] long, n_keep per row
    apc_beta: float | None  # the cutoff this call applies (None under greedy with apc_in_greedy=False)
    kept: Tensor | None = None  # [B, S] bool, the current kept image tokens
    prefill_kept: Tensor | None = None  # [B, S] bool, the prefill's
    edit: KeyBias | None = None  # -inf on the dropped image keys, negative rows only
    selections: int = 0  # forwards whose selection ran
    changes: list[int] = field(default_factory=list)  # per row: selections that changed the kept set


@register_method
class SID(ContrastiveMethod):
    """Self-Introspective Decoding: score tokens by (1 + alpha) * l - alpha * l', where l' comes from the
    same model and input with every image key hidden from layer `layer` on, except the image tokens the
    current token attended to least at layer `layer - 1` (re-selected at every step), keeping only tokens
    plausible under l.

    The negative stream thus amplifies the vision-and-text association hallucinations the model makes
    from a few unimportant image tokens, and the contrast removes them. Both streams run as one batched
    forward per step (rows [positive; negative], separate cache rows); the selection reads the negative
    rows' layer-(layer - 1) attention inside vlmfix's attention function, and the hidden keys are a
    -inf `KeyBias` on the negative rows only.

    Args:
        alpha (float, default 1.0): contrast strength, >= 0 (0 = plain decoding of the positive stream;
            0.5 is what the released code runs).
        apc_beta (float | None, default 0.1): plausibility cutoff in (0, 1]: tokens with
            p(j) < apc_beta * max p under the positive stream are removed; None switches it off.
        apc_in_greedy (bool, default True): apply the cutoff under greedy decoding too (False: greedy
            takes the argmax of the raw contrast, as the released code does).
        keep_ratio (float, default 0.174, about 100/576): share of each row's image tokens the negative
            stream keeps, in [0, 1]; n_keep = round(keep_ratio * image tokens), half up (the official POPE
            preset; its CHAIR preset is 0.087, about 50/576).
        keep (int | None, default None): a fixed number of kept image tokens per row (replaces keep_ratio).
        layer (int, default 2): K, the first layer whose image keys are hidden (>= 1); the selection
            reads layer K - 1.
        reselect ("every_step" | "prefill_only", default "every_step"): select again at every decode
            step (text-aware, as the paper) or once at the prefill.

    Paper: Huo et al., "Self-Introspective Decoding: Alleviating Hallucinations for Large
    Vision-Language Models", ICLR 2025, arXiv 2408.02032 (CT2S, context- and text-aware token selection).
    Departs from the official code: alpha defaults to 1.0 (the code's sampler falls back to 0.5), greedy
    applies the plausibility cutoff, each batch row selects its own tokens from its own attention (the code
    uses row 0 and drops padding), the selection reads the negative rows' layer K - 1 (equal to the positive
    rows' when no other method edits the positive stream below K), and no eager attention or
    `output_attentions` is used.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.SID(alpha=1.0)) as session:
        ...     out = session.generate(**inputs, max_new_tokens=20, do_sample=False)
        >>> kept = session.report()["sid"]["rows"][0]["kept_prefill"]  # image-token indices
    """

    name = "sid"
    needs_image = True

    def __init__(
        self,
        alpha: float = 1.0,
        apc_beta: float | None = 0.1,
        *,
        apc_in_greedy: bool = True,
        keep_ratio: float = POPE_KEEP_RATIO,
        keep: int | None = None,
        layer: int = 2,
        reselect: Reselect = "every_step",
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.apc_beta = check_beta(apc_beta, "apc_beta")
        self.apc_in_greedy = validation.boolean(apc_in_greedy, "apc_in_greedy",
                                                "whether greedy decoding applies the plausibility cutoff")
        self.keep_ratio = validation.number(keep_ratio, "keep_ratio", low=0, high=1,
                                            meaning="the share of image tokens the negative stream keeps")
        self.keep = validation.optional_number(keep, "keep", low=0, integer=True,
                                               meaning="the number of image tokens the negative stream keeps "
                                               "per row (None: use keep_ratio)")
        if isinstance(layer, int) and not isinstance(layer, bool) and layer == 0:
            raise ValueError("`layer` must be an int >= 1, got 0; layer is K, the first layer whose image keys "
                             "are hidden, and the selection reads layer K-1 (the official code's random "
                             "selection at K=0 is not offered).")
        self.layer = validation.number(layer, "layer", low=1, integer=True,
                                       meaning="K, the first masked layer (the selection reads layer K-1)")
        self.reselect = validation.choice(reselect, "reselect", RESELECT,
                                          "when the kept image tokens are selected")

    def check(self, adapter: Adapter) -> None:
        if adapter.has_sliding_window:
            raise UnsupportedModelError(
                f"SID selects and hides image keys by sequence position, and {adapter.family}'s sliding-window "
                f"(or chunked) layers cache the last keys only; SID supports full-attention decoders.")
        adapter.resolve_layers([self.layer], "layer")

    def prepare(self, session: Session) -> SIDState:
        require_engine(session, self)
        spans = session.spans
        lonely = rows_without_context_before_image(spans.image, spans.valid)
        if lonely:
            raise UnsupportedModelError(
                f"SID hides image keys, but in rows {lonely} no text token precedes the image, so a "
                f"query row could be left with no key; start each prompt with its chat template "
                f"(BOS and the user turn before the image).")
        apc = self.apc_beta if self.apc_in_greedy or not is_greedy(session) else None
        state = SIDState(image=spans.image, keep=keep_counts(spans.image, self.keep_ratio, self.keep), apc_beta=apc,
                         changes=[0] * spans.batch_size)

        def rows(call: AttentionCall) -> slice | None:
            if self.reselect == "prefill_only" and state.selections:
                return None
            return negative_rows(session)

        session.observe_for_prompt(NewestRowAttention(
            frozenset({self.layer - 1}), rows, on_scores=lambda _, scores: self._select(state, scores)))
        return state

    def _select(self, state: SIDState, scores: Tensor) -> None:
        """The kept image tokens from the layer-(K-1) scores ([B, kv_len]) and the negative rows' key bias."""
        kept = least_attended(scores, state.image, state.keep)  # [B, S]
        if state.kept is None:
            state.prefill_kept = kept
        else:
            changed = (kept != state.kept).any(dim=1).tolist()
            state.changes = [c + int(x) for c, x in zip(state.changes, changed)]
        state.kept = kept
        state.selections += 1
        dropped = state.image & ~kept
        bias = torch.zeros(dropped.shape, device=dropped.device).masked_fill(dropped, float("-inf"))
        state.edit = KeyBias(bias=bias[:, None, :], stream="negative")  # [B, 1, S]

    def edits(self, state: SIDState, layer_idx: int) -> Sequence[Edit]:
        return (state.edit,) if state.edit is not None and layer_idx >= self.layer else ()

    def negative_inputs(self, session: Session, state: SIDState) -> dict[str, Any]:
        return dict(session.inputs)  # the same prompts and images; the key mask makes them negative

    def combine(self, state: SIDState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        return contrast_logits(positive_logits, negative_logits, self.alpha, state.apc_beta)

    def report(self, state: SIDState) -> dict[str, Any]:
        """Per row: image tokens, how many the negative stream keeps, the kept image-token indices (0-based in
        the row's image-token order) at the prefill and at the latest step, and how often the set changed."""
        image = state.image
        prefill = image_indices(state.prefill_kept, image) if state.prefill_kept is not None else None
        latest = image_indices(state.kept, image) if state.kept is not None else None
        rows = []
        for b in range(image.shape[0]):
            rows.append({
                "image_tokens": int(image[b].sum()),
                "keep": int(state.keep[b]),
                "kept_prefill": prefill[b] if prefill is not None else None,
                "kept_last": latest[b] if latest is not None else None,
                "selection_changes": state.changes[b],
            })
        return {"layer": self.layer, "reselect": self.reselect, "alpha": self.alpha, "apc_beta": state.apc_beta,
                "selections": state.selections, "rows": rows}
