"""PAI: pay more attention to the image (boost of image-key logits, optional image-free refinement)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlmfix import validation
from vlmfix.decoding.edits import Edit, KeyBias
from vlmfix.decoding.method import register_method
from vlmfix.methods.image_boost import BoostState, GainRecorder, check_margin, first_token_start, pai_band
from vlmfix.methods.image_free import ImageFreeRefinement, check_refinement

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session


@register_method
class PAI(ImageFreeRefinement):
    """Amplify the newest token's attention logits to every image token, z <- z + alpha * |z|, in
    layers 2 .. L-1; optionally refine the next-token scores against an image-free stream.

    Args:
        alpha (float, default 0.2): the margin in z + alpha*|z| (pre-softmax, scaled scores; 0 = off).
        layers (list[int] | None, default None): language-model layers to boost; None = 2 .. L-1.
        cfg (bool, default True): the image-free refinement, scores = gamma * (log p_img - log p_noimg)
            + log p_noimg with tokens below `plausibility` times the top image-stream probability
            removed. It runs as a second stream of B rows in the same batched forward (prompts without
            their image tokens, unboosted); see `vlmfix.decoding.contrastive`.
        gamma (float, default 1.1): refinement strength (>= 1; 1 = image-stream scores).
        plausibility (float, default 0.1): the refinement's cutoff, in (0, 1].
        skip_first_token_boost (bool, default False): leave the prompt's last row (the first generated
            token) unboosted, as PAI's code does when CFG is on.

    Paper: Liu, Zheng, Chen, "Paying More Attention to Image: A Training-Free Method for Alleviating
    Hallucination in LVLMs", ECCV 2024, arXiv 2407.21771, Sec. 3 (image attention amplification and
    image-centric logit refinement).

    Departs from the official code: the first generated token is boosted with CFG on too (the code
    gates it off), and the image-free stream shares the batched forward instead of a second model call.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.PAI(alpha=0.2, cfg=False)],
        ...                       tokenizer=processor, max_new_tokens=24)
    """

    name = "pai"
    needs_image = True

    def __init__(
        self,
        alpha: float = 0.2,
        *,
        layers: Sequence[int] | None = None,
        cfg: bool = True,
        gamma: float = 1.1,
        plausibility: float = 0.1,
        skip_first_token_boost: bool = False,
    ) -> None:
        self.alpha = check_margin(alpha, "alpha")
        self.layers = validation.indices(layers, "layers", meaning="None boosts layers 2 .. L-1")
        self.cfg, self.gamma, self.plausibility = check_refinement(cfg, gamma, plausibility)
        self.skip_first_token_boost = validation.boolean(
            skip_first_token_boost, "skip_first_token_boost", "whether the first generated token is left unboosted"
        )

    def check(self, adapter: Adapter) -> None:
        adapter.resolve_layers(self.layers)

    def prepare(self, session: Session) -> BoostState:
        self.require_stream_engine(session)
        layers = session.adapter.resolve_layers(self.layers, default=pai_band(session.adapter.num_layers))
        image = session.spans.image  # [batch, seq] bool
        gain = image[:, None, :].float() * self.alpha  # [batch, 1, seq]
        start = first_token_start(session.inputs["input_ids"], self.skip_first_token_boost)
        edit = KeyBias(abs_gain=gain, rows="last", from_position=start)
        info = {
            "layers": list(layers),
            "image_tokens": image.sum(dim=1).tolist(),
            "first_token_boosted": not self.skip_first_token_boost,
            "refinement": {"gamma": self.gamma, "plausibility": self.plausibility} if self.cfg else None,
        }
        state = BoostState(edit=edit, layers=frozenset(layers), info=info)
        if session.record and self.alpha > 0:
            recorder = GainRecorder(image, state)
            session.observe_for_prompt(  # decoding forwards only, not another method's analysis pass
                lambda call: None if session.in_extra_pass else recorder.observe(call, session.rows_of_prompt))
            state.recorder = recorder
        return state

    def edits(self, state: BoostState, layer_idx: int) -> Sequence[Edit]:
        return state.edits(layer_idx)

    def report(self, state: BoostState) -> dict[str, Any]:
        """Per row: how many image keys were boosted; the boosted layers and refinement settings; with
        `record=True`, `image_gain`: per row and image token, the mean factor the boost gave its attention."""
        out = {"alpha": self.alpha, **state.info}
        if state.recorder is not None:
            out["image_gain"] = state.recorder.report()
        return out
