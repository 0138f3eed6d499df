"""AvisC: contrast with a negative stream whose image embeddings are zeroed except the most-attended ("blind") ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlmfix import validation
from vlmfix.decoding.contrastive import ContrastiveMethod, negative_rows, require_engine
from vlmfix.decoding.method import register_method
from vlmfix.methods.contrast import check_alpha, check_beta, contrast_logits
from vlmfix.methods.image_selection import (
    NewestRowAttention,
    above_mean_std,
    all_rows,
    image_indices,
    keep_counts,
    most_attended,
    top_p_layers,
)

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session


@dataclass
class AvisCState:
    """Per call: the probe's choice of layers and blind tokens, and the negative rows' zeroed positions."""

    image: Tensor  # [B, S] bool, the prompt's image tokens
    layers: Tensor  # [B, layers] bool, the layers whose attention was averaged
    kept: Tensor  # [B, S] bool, the blind tokens (embeddings kept)
    zeroed: Tensor  # [B, S] bool, image tokens whose embedding the negative stream zeroes
    embedding_edits: int = 0  # forwards whose negative rows got the zeroed embeddings


@register_method
class AvisC(ContrastiveMethod):
    """Attentional Vision Calibration: score tokens by (1 + alpha) * l - alpha * l', where l' comes from the
    same prompt with the input embeddings of every image token zeroed except the "blind" tokens, the few
    image tokens that draw outsized attention, keeping only tokens plausible under l.

    Blind tokens are found once per prompt batch by a probe prefill of the positive stream (unedited, B rows)
    observed inside vlmfix's attention function: in every layer the newest prompt row's attention (head
    mean); per row, the fewest layers holding `layer_gamma` of the image-attention mass; their mean
    attention per image token; blind = at least mean + lamb * std of the row's image tokens. The negative
    stream then decodes with those rows' other image embeddings zeroed at its prefill (a forward pre-hook on
    the language model), as one batched forward with the positive stream (rows [positive; negative]).

    A zeroed embedding is model-dependent: LLaMA-style models (LLaVA) have no q/k/v biases, so a zero input
    gives zero query and key vectors in the first layer; Qwen2's q/k/v biases turn it into a bias vector.
    vlmfix zeroes the embeddings on every family and does not substitute a key mask.

    Args:
        alpha (float, default 1.0): contrast strength, >= 0 (0 = plain decoding of the positive stream).
        apc_beta (float | None, default 0.1): plausibility cutoff in (0, 1]: tokens with
            p(j) < apc_beta * max p under the positive stream are removed; None switches it off.
        layer_gamma (float, default 0.5): the share of image-attention mass the averaged layers must
            reach, in (0, 1] (top-p over layers).
        lamb (float, default 1.0): blind tokens score >= mean + lamb * std over the row's image tokens.
        keep (int | None, default None): keep the `keep` most-attended image tokens per row instead of
            the mean + lamb * std rule.

    Paper: Woo, Kim, Jang, Choi, Kim, "Don't Miss the Forest for the Trees: Attentional Vision Calibration
    for Large Vision Language Models", arXiv 2405.17820 (Sec. 3: blind-token selection and contrast).
    Departs from the official code: each batch row selects its own layers and tokens from its own image
    span (the code hard-codes LLaVA's image offset 35 and batch 1), the contrast applies under greedy and
    beam search too (the code patched sampling only), the probe is a separate B-row prefill without the
    other methods' edits, and no eager attention or `output_attentions` is used.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.AvisC(alpha=1.0)) as session:
        ...     out = session.generate(**inputs, max_new_tokens=20, do_sample=False)
        >>> blind = session.report()["avisc"]["rows"][0]["kept"]  # image-token indices
    """

    name = "avisc"
    needs_image = True

    def __init__(
        self,
        alpha: float = 1.0,
        apc_beta: float | None = 0.1,
        *,
        layer_gamma: float = 0.5,
        lamb: float = 1.0,
        keep: int | None = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.apc_beta = check_beta(apc_beta, "apc_beta")
        self.layer_gamma = validation.number(layer_gamma, "layer_gamma", low=0, high=1, low_open=True,
                                             meaning="the share of image-attention mass of the averaged layers")
        self.lamb = validation.number(lamb, "lamb", meaning="the blind-token threshold in std units above the mean")
        self.keep = validation.optional_number(keep, "keep", low=0, integer=True,
                                               meaning="the number of most-attended image tokens kept per row "
                                               "(None: the mean + lamb * std rule)")

    def prepare(self, session: Session) -> AvisCState:
        require_engine(session, self)
        image = session.spans.image  # [B, S]
        probe = NewestRowAttention(None, all_rows)
        with session.observing(probe):
            session.forward(session.inputs, with_edits=False)
        layers = session.adapter.num_layers
        missing = sorted(set(range(layers)) - set(probe.scores))
        if missing:
            raise RuntimeError(f"AvisC's probe prefill never reached layers {missing}; the model's attention does "
                               "not go through vlmfix's attention function.")
        scores = torch.stack([probe.scores[layer][:, : image.shape[1]] for layer in range(layers)], dim=1)  # [B, L, S]
        mass = (scores * image[:, None]).sum(dim=-1)  # [B, L]
        chosen = top_p_layers(mass, self.layer_gamma)
        token_scores = (scores * chosen[..., None]).sum(dim=1) / chosen.sum(dim=1, keepdim=True)  # [B, S]
        if self.keep is None:
            kept = above_mean_std(token_scores, image, self.lamb)
        else:
            kept = most_attended(token_scores, image, keep_counts(image, None, self.keep))
        state = AvisCState(image=image, layers=chosen, kept=kept, zeroed=image & ~kept)
        session.hook_for_prompt(session.adapter.language_model, self._zeroing_hook(session, state))
        return state

    @staticmethod
    def _zeroing_hook(session: Session, state: AvisCState) -> Any:
        """Language-model pre-hook: at the two-stream prefill, zero the negative rows' non-blind image embeddings."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            rows = negative_rows(session)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if rows is None or (cache is not None and cache.get_seq_length() > 0):
                return None  # not the engine's prefill: decode steps feed text tokens only
            embeds = kwargs.get("inputs_embeds")  # [2B, S, hidden]
            if embeds is None or embeds.shape[1] != state.zeroed.shape[1]:
                raise RuntimeError(f"AvisC expected the prefill's inputs_embeds of width {state.zeroed.shape[1]} at "
                                   f"the language model, got {None if embeds is None else tuple(embeds.shape)}.")
            negative = embeds[rows].masked_fill(state.zeroed[..., None].to(embeds.device), 0.0)
            state.embedding_edits += 1
            return args, {**kwargs, "inputs_embeds": torch.cat([embeds[: rows.start], negative])}

        return hook

    def negative_inputs(self, session: Session, state: AvisCState) -> dict[str, Any]:
        return dict(session.inputs)  # the same prompts and images; the zeroed embeddings make them negative

    def combine(self, state: AvisCState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        return contrast_logits(positive_logits, negative_logits, self.alpha, self.apc_beta)

    def report(self, state: AvisCState) -> dict[str, Any]:
        """Per row: image tokens, the averaged layers, the kept (blind) and zeroed image-token indices (0-based in
        the row's image-token order); `embedding_edits` counts the prefills whose negative rows were zeroed."""
        kept, zeroed = image_indices(state.kept, state.image), image_indices(state.zeroed, state.image)
        rows = []
        for b in range(state.image.shape[0]):
            rows.append({
                "image_tokens": int(state.image[b].sum()),
                "layers": state.layers[b].nonzero().flatten().tolist(),
                "kept": kept[b],
                "zeroed": zeroed[b],
            })
        return {"alpha": self.alpha, "apc_beta": self.apc_beta, "layer_gamma": self.layer_gamma, "lamb": self.lamb,
                "keep": self.keep, "embedding_edits": state.embedding_edits, "rows": rows}
