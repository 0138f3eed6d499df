"""OPERA: beam search with an over-trust penalty and retrospection-allocation (spec opera.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from vlmfix import validation
from vlmfix.decoding.method import Method, register_method
from vlmfix.errors import UnsupportedModelError
from vlmfix.methods.opera_rules import SCORE_RANGES

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.opera import OperaState
    from vlmfix.decoding.session import Session


@register_method
class OPERA(Method):
    """Penalise candidates whose last-layer attention piles onto one earlier "summary" token, and roll back
    to re-decide the token after a summary token that keeps attracting every beam.

    OPERA is a beam search (num_beams >= 2, do_sample=False): each beam keeps its top-C candidates by raw
    logit; each candidate's attention row over the generated tokens (last layer, max over heads,
    renormalised) completes a lower-triangular matrix whose strongest column product, phi = 1e-7 *
    prod (scale * A[i, c]), is subtracted from the candidate's logit before a log-softmax over the
    candidates. For the first `image_bonus_steps` tokens the candidate's image-attention mass is added
    instead. When the same column has been the summary location more than `threshold` times in every beam
    of an item, that item alone rolls back to the token after it and re-decides it with the earlier choices
    forbidden.

    Run it with `session.generate` or `vlmfix.generate(..., num_beams=5)`: it owns the decoding loop (generate's
    `custom_generate`), so a bare `model.generate` inside `vlmfix.apply` raises. It composes with attention
    methods whose edits apply to every query row (VHR, PAI without refinement), which then edit its forwards
    too; it refuses two-stream methods (VCD, DCD, refinements: they decide the token themselves) and VAR,
    GIFT and DualStream (they assume one new token per decode forward; OPERA feeds C candidates per forward).
    Its report counts, per item, the steps scored with the bonus and with the penalty, the rollbacks and their
    positions, and vetoed beams.

    Args:
        scale_factor (float, default 50): sigma, the scale of each attention weight in the column product (> 0).
        threshold (int, default 15): r, a rollback needs more than r repeats of the location in every beam (>= 0).
        num_attn_candidates (int, default 5): C, candidates per beam, also the rollbacks allowed per position (>= 1).
        penalty_weights (float, default 1.0): alpha, the weight of the penalty (and of the bonus) (>= 0).
        window (int, default 512): W, the generated tokens the local matrix covers (>= 1).
        image_bonus_steps (int, default 10): generated tokens scored with the image bonus instead of the penalty
            (0: the penalty from the first token).
        min_location (int, default 10): the earliest generated position a rollback location may have (>= 0).
        score_range ("float16" | "exact", default "float16"): "float16" keeps the official code's float16 range
            (phi < 2^-24 is 0, phi > 65504 is a veto); "exact" keeps the fp32 product (a veto only beyond
            fp32's range).
        history ("lineage" | "slot", default "lineage"): location histories follow each hypothesis's
            ancestry, or stay with the beam slot as in the official code.
        realloc ("vocab" | "candidates", default "vocab"): the re-decision after a rollback ranks the whole
            vocabulary (official code) or each beam's top-C candidates, always without the penalty.
        candidate_pass ("tree" | "sequential", default "tree"): the look-ahead as one forward of C query rows per
            step, or as C one-row forwards each followed by a cache crop (the official code's shape; slower, the
            same tokens up to float rounding).

    Paper: Huang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language Models via Over-Trust
    Penalty and Retrospection-Allocation", CVPR 2024, arXiv 2311.17911 (Sec. 3: over-trust logit penalty,
    retrospection-allocation).
    Departs from the official code: the look-ahead is one chunked forward per step that also serves as the
    next step's forward (the official code runs 1 + C forwards and re-prefills the prompt on each rollback;
    `candidate_pass="sequential"` runs the C look-ahead forwards one by one as it does);
    rollback state is per batch item, histories follow beam lineage, phi is computed in fp32 log space with
    float16's range kept (a beam whose candidates are all vetoed gets no continuation instead of flat -999
    scores), and the attention row is read in vlmfix's attention function, never with output_attentions.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.OPERA()], num_beams=5, max_new_tokens=32)
    """

    name = "opera"
    needs_image = False
    owns_decoding: ClassVar[bool] = True

    def __init__(
        self,
        scale_factor: float = 50.0,
        threshold: int = 15,
        num_attn_candidates: int = 5,
        penalty_weights: float = 1.0,
        window: int = 512,
        image_bonus_steps: int = 10,
        min_location: int = 10,
        score_range: Literal["float16", "exact"] = "float16",
        history: Literal["lineage", "slot"] = "lineage",
        realloc: Literal["vocab", "candidates"] = "vocab",
        candidate_pass: Literal["tree", "sequential"] = "tree",
    ) -> None:
        self.scale_factor = validation.number(scale_factor, "scale_factor", low=0, low_open=True,
                                              meaning="sigma, the scale of each attention weight (paper: 50)")
        self.threshold = validation.number(threshold, "threshold", low=0, integer=True,
                                           meaning="r, the repeats of a location that trigger a rollback (paper: 15)")
        self.num_attn_candidates = validation.number(
            num_attn_candidates, "num_attn_candidates", low=1, integer=True,
            meaning="C, the candidates per beam (paper: 5)")
        self.penalty_weights = validation.number(penalty_weights, "penalty_weights", low=0,
                                                 meaning="alpha, the weight of the over-trust penalty (paper: 1)")
        self.window = validation.number(window, "window", low=1, integer=True,
                                        meaning="W, the generated tokens of the local matrix (paper: 512)")
        self.image_bonus_steps = validation.number(
            image_bonus_steps, "image_bonus_steps", low=0, integer=True,
            meaning="the first generated tokens scored with the image bonus (official code: 10)")
        self.min_location = validation.number(min_location, "min_location", low=0, integer=True,
                                              meaning="the earliest rollback location (official code: 10)")
        self.score_range = validation.choice(score_range, "score_range", SCORE_RANGES)
        self.history = validation.choice(history, "history", ("lineage", "slot"))
        self.realloc = validation.choice(realloc, "realloc", ("vocab", "candidates"))
        self.candidate_pass = validation.choice(candidate_pass, "candidate_pass", ("tree", "sequential"))

    def check(self, adapter: Adapter) -> None:
        if adapter.has_sliding_window:
            raise UnsupportedModelError(
                f"OPERA rewrites cache slots of plain dynamic layers, and {adapter.family}'s sliding-window "
                f"(or chunked) layers keep the last keys only; OPERA supports full-attention decoders.")
        if adapter.has_indexed_attention:
            raise UnsupportedModelError(
                f"OPERA rewrites cache slots of plain dynamic layers, and {adapter.family}'s sparse-attention layers "
                "cache the indexer's keys beside the attention's (DynamicIndexedLayer, MiniMax M3's sparse cache "
                "layer), which those rewrites and rollbacks would leave out of step; OPERA supports full-attention "
                "decoders.")
        implementation = adapter.text_config._attn_implementation or "eager"
        if "flash" in implementation:
            raise ValueError(f"OPERA needs an attention backend that honours 4-D masks (its candidate chunks and "
                             f"rollback holes); the model uses {implementation!r}. Load it with "
                             f"attn_implementation='sdpa' or 'eager'.")

    def prepare(self, session: Session) -> OperaState:
        from vlmfix.decoding.opera import require_loop

        search = require_loop(session)
        session.observe_for_prompt(search.observe)
        session.hook_for_prompt(session.adapter.language_model, search.read_positions)  # the prefill's positions
        if search.state is None:
            raise ValueError("OPERA's loop starts its state before the prefill; run it through session.generate.")
        return search.state

    def report(self, state: OperaState) -> dict[str, Any]:
        return {
            "candidate_pass": self.candidate_pass,
            "bonus_steps": list(state.bonus_steps),
            "penalty_steps": list(state.penalty_steps),
            "rollbacks": list(state.rollbacks),
            "rollback_positions": [list(p) for p in state.rollback_positions],
            "vetoed_beams": list(state.vetoed_beams),
            "lifted_vetoes": list(state.lifted_vetoes),
        }
