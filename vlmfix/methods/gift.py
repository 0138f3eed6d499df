"""GIFT: a saliency map from the instruction's "gaze shifts" steers the newest token to image regions."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import (
    Edit,
    FusionReweight,
    Reweight,
    additive_mask,
    fit_keys,
    key_probabilities,
    repeat_kv,
    top_k_mask,
)
from vlmfix.decoding.method import Method, register_method
from vlmfix.errors import SpanError
from vlmfix.methods.content_words import (
    overlapping_tokens,
    rule_content_words,
    spacy_available,
    spacy_content_words,
    token_char_ranges,
)
from vlmfix.methods.newest_row import LastRowRewrite, install_last_row_rewrite

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session

ContentWords = Literal["pos", "spacy", "rule", "all"] | Callable[[str], Sequence[tuple[int, int]]]
NEVER = 2**62  # a `from_position` no query row reaches: the row is left unedited


@dataclass(frozen=True)
class GiftDefaults:
    """Per-model layers and alpha, and where they come from."""

    saliency_layers: tuple[int, ...]
    fusion_layers: tuple[int, ...]
    alpha: float
    source: str


# (family, layers, heads) -> (saliency layers, fusion layers, alpha, source); spec gift.md section 5
PUBLISHED: dict[tuple[str, int, int], GiftDefaults] = {
    ("llava", 32, 32): GiftDefaults((11,), tuple(range(12, 23)), 5.0, "LLaVA-1.5-7B, official config"),
    ("llava", 40, 40): GiftDefaults((10,), tuple(range(14, 21)), 5.0, "LLaVA-1.5-13B, official config"),
    ("qwen2_vl", 28, 28): GiftDefaults((14,), tuple(range(5, 19)), 4.0, "Qwen2-VL-7B, official config"),
    ("llava_next", 32, 32): GiftDefaults(
        (11,),
        tuple(range(12, 23)),
        5.0,
        "LLaVA-NeXT-7B: LLaVA-1.5-7B's values (not published; check with rule R3)",
    ),
    ("qwen2_5_vl", 28, 28): GiftDefaults(
        (14,),
        tuple(range(5, 19)),
        4.0,
        "Qwen2.5-VL-7B: Qwen2-VL-7B's values (not published; check with rule R3)",
    ),
}
# other models: the reference model's layer positions scaled to depth (layers, saliency, fusion band, alpha)
DEPTH_RULE = {"llava": (32, 11, (12, 22), 5.0), "qwen": (28, 14, (5, 18), 4.0)}


def gift_defaults(adapter: Adapter) -> GiftDefaults:
    """GIFT's layers and alpha for `adapter`'s model: published values, else the depth rule.

    Depth rule (vlmfix, for unpublished models): take LLaVA-1.5-7B's positions (Qwen families: Qwen2-VL-7B's)
    and scale them by depth, s = round(11 * L / 32), fusion = round(12 * L / 32) .. round(22 * L / 32).
    Better: calibrate the saliency layer once with saliency_layers="auto" (rule R3 of the spec).
    """
    depth = adapter.num_layers
    key = (adapter.family, depth, adapter.num_heads)
    if key in PUBLISHED:
        return PUBLISHED[key]
    ref_depth, ref_s, (ref_lo, ref_hi), alpha = DEPTH_RULE[
        "qwen" if adapter.family.startswith("qwen") else "llava"
    ]
    scale = depth / ref_depth
    saliency = min(depth - 1, round(ref_s * scale))
    lo, hi = min(depth - 1, round(ref_lo * scale)), min(depth - 1, round(ref_hi * scale))
    return GiftDefaults(
        (saliency,),
        tuple(range(lo, max(lo, hi) + 1)),
        alpha,
        f"depth rule from the {ref_depth}-layer reference (not published)",
    )


@dataclass
class GiftRow:
    """What GIFT decided for one prompt row."""

    query_positions: list[int]
    content_positions: list[int]
    content_words: list[str]
    saliency_layers: list[int] = field(default_factory=list)
    saliency_heads: dict[int, list[int]] = field(default_factory=dict)
    saliency: list[float] = field(default_factory=list)  # S_hat over the row's image tokens
    skipped: str | None = None


@dataclass
class GiftState:
    rows: list[GiftRow]
    fusion_layers: frozenset[int]
    edit: FusionReweight | None  # pooled ratio
    rewrite: LastRowRewrite | None  # per-head ratio
    defaults: GiftDefaults
    tagger: str


class _SaliencyDone(Exception):
    """Ends the saliency pass after its last needed layer."""


@register_method
class GIFT(Method):
    """Steer the newest token's attention toward the image regions the instruction's content words
    "gaze" at, while keeping the balance between image and instruction attention.

    Before generation, one extra prefill (no edits) reads the saliency layer's attention of each content
    word of the instruction and of the token before it; the positive increments to each image token
    ("gaze shifts") of the top `head_fraction` heads, averaged, clipped at 3 sigma and min-max normalised,
    give S in [0, 1] and multipliers M = exp(alpha * S). Then in the fusion layers, for the newest query
    row at every step: image keys are multiplied by M in the top heads by image mass, instruction keys
    by beta * r in the top heads by instruction mass (r = enhanced / original image mass), and each edited
    head is renormalised. Rows with no content word or a flat map are left unedited (the report says why).

    Args:
        alpha (float | None, default None): saliency strength; None = the model's default (5 for LLaVA,
            4 for Qwen). 0 = no change.
        saliency_layers (list[int] | "auto" | None, default None): layers whose gaze shifts build the map;
            None = the model's default; "auto" = per prompt row, the layer with the largest total shift.
        fusion_layers (list[int] | None, default None): layers edited during generation; None = default.
        beta (float, default 1.0): extra factor on the instruction keys (beta * r).
        head_fraction (float, default 0.5): share of heads selected (saliency heads and both head sets).
        ratio ("pooled" | "per_head", default "pooled"): r pooled over the image heads (official code), or
            each instruction head's own enhanced/original image mass (vlmfix reading).
        scale_query_tokens ("all" | "informative", default "all"): which instruction tokens get beta * r.
        content_words ("pos" | "spacy" | "rule" | "all" | callable, default "pos"): informative words.
            "pos": spaCy POS tags (NOUN, PROPN, VERB, ADJ, ADV, NUM) when spaCy and en_core_web_sm are
            installed, else the dependency-free rule; "spacy": spaCy required; "rule": function words out;
            "all": every instruction token; a callable maps the instruction text to [(start, end)] ranges.

    Default layers per model (family, depth x heads): LLaVA-1.5-7B saliency 11, fusion 12-22, alpha 5;
    13B: 10, 14-20, 5; Qwen2-VL-7B: 14, 5-18, 4; LLaVA-NeXT-7B and Qwen2.5-VL-7B reuse the 7B values;
    other models: `gift_defaults`' depth rule.

    Paper: Qi, Shang, Spiliopoulou, Pappas, "GIFT: Gaze Shift-Guided Cross-modal Fusion Enhancement for
    Vision-Language Models", arXiv 2510.22067, Sec. 3 (saliency from gaze shifts; fusion enhancement).

    Departs from the official code: the saliency pass computes only the needed attention slice in the
    chosen layers (no eager attention or output_attentions), spans come from the prompt's structure
    instead of fixed offsets, batches of any size, and empty or flat maps leave the row unedited.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.GIFT(), tokenizer=processor) as session:
        ...     out = model.generate(**inputs, max_new_tokens=24)
        >>> words = session.report()["gift"]["rows"][0]["content_words"]
    """

    name = "gift"
    one_token_decode = True  # last-row edits and rewrites
    needs_image = True
    needs_tokenizer = True

    def __init__(
        self,
        alpha: float | None = None,
        *,
        saliency_layers: Sequence[int] | Literal["auto"] | None = None,
        fusion_layers: Sequence[int] | None = None,
        beta: float = 1.0,
        head_fraction: float = 0.5,
        ratio: Literal["pooled", "per_head"] = "pooled",
        scale_query_tokens: Literal["all", "informative"] = "all",
        content_words: ContentWords = "pos",
    ) -> None:
        self.alpha = validation.optional_number(alpha, "alpha", low=0, meaning="the saliency strength: multipliers "
                                                "are exp(alpha * saliency); None takes the model's default")
        if saliency_layers == "auto":
            self.saliency_layers: tuple[int, ...] | Literal["auto"] | None = "auto"
        else:
            self.saliency_layers = validation.indices(saliency_layers, "saliency_layers",
                                                      meaning="None takes the model's default, 'auto' picks per row")
        self.fusion_layers = validation.indices(fusion_layers, "fusion_layers",
                                                meaning="None takes the model's default")
        self.beta = validation.number(beta, "beta", low=0, low_open=True, meaning="the factor of the instruction "
                                      "keys (beta * r)")
        self.head_fraction = validation.number(head_fraction, "head_fraction", low=0, high=1, low_open=True,
                                               meaning="the share of heads selected by image and by instruction mass")
        self.ratio = validation.choice(ratio, "ratio", ("pooled", "per_head"))
        self.scale_query_tokens = validation.choice(scale_query_tokens, "scale_query_tokens", ("all", "informative"))
        if not callable(content_words):
            validation.choice(content_words, "content_words", ("pos", "spacy", "rule", "all"),
                              "Or pass a callable (text) -> [(start, end)] of the informative words")
        if content_words == "spacy":
            spacy_content_words("")  # fail at construction when spaCy or its model is missing
        self.content_words = content_words

    def check(self, adapter: Adapter) -> None:
        adapter.resolve_layers(self.fusion_layers, "fusion_layers")
        if self.saliency_layers != "auto":
            adapter.resolve_layers(self.saliency_layers, "saliency_layers")

    # ------------------------------------------------------------------ prepare
    def prepare(self, session: Session) -> GiftState:
        adapter = session.adapter
        defaults = gift_defaults(adapter)
        alpha = defaults.alpha if self.alpha is None else self.alpha
        fusion = adapter.resolve_layers(self.fusion_layers, "fusion_layers", defaults.fusion_layers)
        auto = self.saliency_layers == "auto"
        saliency = (
            tuple(range(adapter.num_layers))
            if self.saliency_layers == "auto"
            else adapter.resolve_layers(self.saliency_layers, "saliency_layers", defaults.saliency_layers)
        )

        spans = session.spans
        input_ids = session.inputs["input_ids"]  # [batch, seq]
        extractor, tagger = self._extractor()
        rows = [
            self._query_row(session.tokenizer, input_ids[b], spans.instruction[b], extractor, b)
            for b in range(input_ids.shape[0])
        ]
        shifts = self._gaze_shifts(session, rows, saliency)  # per row: {layer: D [heads, |C|, N_v]}

        batch, seq = input_ids.shape
        multiplier = torch.ones(batch, seq, device=input_ids.device)
        for b, row in enumerate(rows):
            if row.skipped is None:
                row_m = self._multiplier(row, shifts[b], alpha, auto)
                if row_m is not None:
                    multiplier[b, spans.image[b]] = row_m.to(multiplier.device)
        for row in rows:
            if row.skipped is not None:
                warnings.warn(f"GIFT leaves a prompt row unedited: {row.skipped}.", stacklevel=2)

        query = torch.zeros_like(spans.instruction)
        for b, row in enumerate(rows):
            chosen = (
                row.content_positions if self.scale_query_tokens == "informative" else row.query_positions
            )
            query[b, chosen] = True
        start = torch.tensor([NEVER if row.skipped else 0 for row in rows], device=input_ids.device)
        edit = rewrite = None
        if any(row.skipped is None for row in rows):
            if self.ratio == "pooled":
                edit = FusionReweight(
                    image=spans.image,
                    multiplier=multiplier,
                    query=query,
                    beta=self.beta,
                    head_fraction=self.head_fraction,
                    rows="last",
                    from_position=start,
                )
            else:
                rewrite = LastRowRewrite(frozenset(fusion))
                install_last_row_rewrite(
                    session, rewrite, self._per_head_edit(spans.image, multiplier, query, start)
                )
        return GiftState(
            rows=rows,
            fusion_layers=frozenset(fusion),
            edit=edit,
            rewrite=rewrite,
            defaults=GiftDefaults(tuple(saliency) if not auto else (), tuple(fusion), alpha, defaults.source),
            tagger=tagger,
        )

    def _extractor(self) -> tuple[Callable[[str], Sequence[tuple[int, int]]] | None, str]:
        if callable(self.content_words):
            return self.content_words, "callable"
        if self.content_words == "all":
            return None, "all"
        if self.content_words == "spacy" or (self.content_words == "pos" and spacy_available()):
            return spacy_content_words, "spacy"
        return rule_content_words, "rule"

    @staticmethod
    def _query_row(tokenizer: Any, ids: Tensor, instruction: Tensor, extractor: Any, b: int) -> GiftRow:
        """Q (the instruction, whitespace-only tokens at its ends trimmed) and its content tokens C."""
        positions = instruction.nonzero().flatten().tolist()
        pieces = [tokenizer.decode([int(ids[p])], skip_special_tokens=False) for p in positions]
        while positions and not pieces[0].strip():
            positions, pieces = positions[1:], pieces[1:]
        while positions and not pieces[-1].strip():
            positions, pieces = positions[:-1], pieces[:-1]
        if not positions:
            raise SpanError(
                f"GIFT needs a text query after the image, but prompt row {b} has no instruction tokens; put "
                f"the question after the image, or pass spans={{'instruction': [...]}} to vlmfix."
            )
        token_ids = [int(ids[p]) for p in positions]
        text, ranges = token_char_ranges(tokenizer, token_ids)
        if extractor is None:
            chosen = list(range(len(positions)))
        else:
            words = [(int(s), int(e)) for s, e in extractor(text)]
            chosen = overlapping_tokens(ranges, words)
        row = GiftRow(
            query_positions=positions,
            content_positions=[positions[i] for i in chosen],
            content_words=[text[ranges[i][0] : ranges[i][1]].strip() for i in chosen],
        )
        if not chosen:
            row.skipped = f"no content word in the instruction {text.strip()!r}"
        return row

    # ------------------------------------------------------------------ saliency pass
    def _gaze_shifts(
        self, session: Session, rows: list[GiftRow], layers: tuple[int, ...]
    ) -> list[dict[int, Tensor]]:
        """One extra prefill (no edits) reading D^l = max(0, A[c] - A[c - 1]) on image columns, per row."""
        shifts: list[dict[int, Tensor]] = [{} for _ in rows]
        active = [b for b, row in enumerate(rows) if row.skipped is None]
        if not active:
            return shifts
        image = session.spans.image
        wanted, last = frozenset(layers), max(layers)
        current = {b: torch.tensor(rows[b].content_positions, device=image.device) for b in active}

        def observer(call: AttentionCall) -> None:
            if call.layer_idx not in wanted:
                return None
            batch, heads, seq, _ = call.query.shape
            key = repeat_kv(call.key, heads)  # [batch, heads, seq, head_dim]
            scaling = call.query.shape[-1] ** -0.5 if call.scaling is None else call.scaling
            mask = additive_mask(
                call.attention_mask, batch, seq, seq, call.query.device
            )  # [batch|1, 1|heads, seq, seq]: one per head where key-value groups select their own keys (MiniMax M3)
            for b in active:
                pos = current[b].to(call.query.device)
                idx = torch.cat([pos, pos - 1])  # content rows, then the rows just before them
                z = (
                    call.query[b, :, idx].float() @ key[b].float().transpose(-1, -2) * scaling
                )  # [heads, 2c, seq]
                z = z + mask[b if mask.shape[0] > 1 else 0, :, idx]  # [1|heads, 2c, seq], each head its own
                probs = key_probabilities(z, call.sinks)[:, :, image[b].to(z.device)]  # [heads, 2c, N_v]
                now, before = probs.split(len(pos), dim=1)
                shifts[b][call.layer_idx] = (now - before).clamp_min(0.0)  # [heads, c, N_v]
            if call.layer_idx == last:
                raise _SaliencyDone
            return None

        try:
            with session.observing(observer):
                session.forward(session.inputs, with_edits=False)
        except _SaliencyDone:
            pass
        return shifts

    def _multiplier(self, row: GiftRow, shifts: dict[int, Tensor], alpha: float, auto: bool) -> Tensor | None:
        """M = exp(alpha * S_hat) over the row's image tokens, or None (row skipped) for a flat map."""
        if auto:
            best = max(shifts, key=lambda layer: float(shifts[layer].sum()))
            shifts = {best: shifts[best]}
        kept = []
        for layer, d in sorted(shifts.items()):  # d: [heads, c, N_v]
            count = max(1, math.floor(d.shape[0] * self.head_fraction))
            heads = d.sum(dim=(1, 2)).topk(count).indices.sort().values
            row.saliency_heads[layer] = heads.tolist()
            kept.append(d[heads])
        row.saliency_layers = sorted(shifts)
        s_raw = torch.cat(kept, dim=0).mean(dim=(0, 1))  # [N_v]
        if s_raw.numel() > 1:
            mu, sd = s_raw.mean(), s_raw.std(unbiased=True)
            s_raw = s_raw.clamp(float(mu - 3 * sd), float(mu + 3 * sd))
        low, high = s_raw.min(), s_raw.max()
        if not bool(high > low):
            row.skipped = "flat saliency map (no gaze shift varies across image tokens)"
            return None
        s_hat = (s_raw - low) / (high - low)
        row.saliency = s_hat.tolist()
        return torch.exp(alpha * s_hat)

    # ------------------------------------------------------------------ generation
    def _per_head_edit(self, image: Tensor, multiplier: Tensor, query: Tensor, start: Tensor):
        """The per-head-ratio reading: a `Reweight` built from the newest row's unedited probabilities."""
        beta, fraction = self.beta, self.head_fraction

        def make(layer_idx: int, probs: Tensor) -> Edit:
            # probs: [batch, heads, 1, kv_len]
            p = probs[:, :, 0]
            batch, heads, kv_len = p.shape
            img = fit_keys(image, kv_len, image.shape[0], False)[:batch, None].to(p.device)  # [batch, 1, kv_len]
            qry = fit_keys(query, kv_len, query.shape[0], False)[:batch, None].to(p.device)
            mult = fit_keys(multiplier, kv_len, multiplier.shape[0], 1.0)[:batch, None].to(p.device)
            count = math.floor(heads * fraction)
            image_mass, query_mass = (p * img).sum(-1), (p * qry).sum(-1)  # [batch, heads]
            weighted = (p * img * mult).sum(-1)
            ratio = torch.where(
                image_mass > 0, weighted / image_mass.clamp_min(1e-30), torch.ones_like(image_mass)
            )
            factor = torch.ones_like(p)
            image_heads, query_heads = top_k_mask(image_mass, count), top_k_mask(query_mass, count)  # [batch, heads]
            factor = torch.where(img & image_heads[..., None], mult.expand_as(p), factor)
            factor = torch.where(qry & query_heads[..., None], (beta * ratio)[..., None].expand_as(p), factor)
            return Reweight(multiplier=factor, rows="last", from_position=start[:batch])

        return make

    def edits(self, state: GiftState, layer_idx: int) -> Sequence[Edit]:
        if layer_idx not in state.fusion_layers:
            return ()
        if state.rewrite is not None:
            state.rewrite.arm(layer_idx)
            return ()
        return (state.edit,) if state.edit is not None else ()

    def report(self, state: GiftState) -> dict[str, Any]:
        """Per row: the instruction's content words and positions, saliency layers and heads, the map
        S_hat over the row's image tokens, and why a row was left unedited (`skipped`)."""
        return {
            "alpha": state.defaults.alpha,
            "fusion_layers": list(state.defaults.fusion_layers),
            "defaults_from": state.defaults.source,
            "tagger": state.tagger,
            "rows": [
                {
                    "content_words": row.content_words,
                    "content_positions": row.content_positions,
                    "query_positions": row.query_positions,
                    "saliency_layers": row.saliency_layers,
                    "saliency_heads": {int(k): v for k, v in row.saliency_heads.items()},
                    "saliency": row.saliency,
                    "edited": row.skipped is None,
                    "skipped": row.skipped,
                }
                for row in state.rows
            ],
        }
