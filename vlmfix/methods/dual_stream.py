"""Dual-stream token emphasis ("Fixing Imbalanced Attention" / PAINT): PAI's boost on selected image
tokens only, the local set with margin alpha and the summary set with margin beta. (The paper calls the two
selections "streams"; in vlmfix a stream is a block of rows of the two-stream engine, so here they are sets.)"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.edits import Edit, KeyBias, fit_keys, top_k_mask
from vlmfix.decoding.method import register_method
from vlmfix.errors import UnsupportedModelError, VlmfixError
from vlmfix.methods.image_boost import check_margin, first_token_start, pai_band
from vlmfix.methods.image_free import ImageFreeRefinement, check_refinement
from vlmfix.methods.newest_row import LastRowRewrite, install_last_row_rewrite
from vlmfix.methods.vision_attention import (
    UnitScores,
    VisionProbe,
    clip_units,
    qwen_units,
    vision_layers_of,
)

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session

# selector(model, inputs) -> (local, summary): [batch, seq] bool masks over image tokens
Selector = Callable[[Any, dict[str, Any]], tuple[Tensor, Tensor]]
# families whose vision tower and image-token packing the built-in selection maps (others need `selector`)
SELECTION_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
SUBSTITUTE = "CLS-free substitute (vlmfix reading): attention received in vision blocks, per 2x2 merge group"


def tukey_mask(scores: Tensor) -> Tensor:
    """[n] bool: scores above the upper Tukey fence Q3 + 1.5 IQR (linear-interpolated quartiles)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return scores > q3 + 1.5 * (q3 - q1)


@dataclass
class DualStreamState:
    layers: frozenset[int]
    start: Tensor | None
    image: Tensor  # [batch, seq]
    selector_name: str
    probe: VisionProbe | None = None
    finish: Callable[[], tuple[Tensor, Tensor]] | None = None  # lazily: (local, summary) [batch, seq]
    local: Tensor | None = None
    summary: Tensor | None = None
    edit: KeyBias | None = None
    rewrite: LastRowRewrite | None = None
    info: dict[str, Any] = field(default_factory=dict)


@register_method
class DualStream(ImageFreeRefinement):
    """Boost the newest token's attention logits, z <- z + m * |z|, only on selected image tokens: local
    tokens (top `local_ratio` of patches by the first vision layer's [CLS] attention) with m = alpha, and
    summary tokens (Tukey outliers of [CLS] attention in the layer that feeds the language model) with
    m = beta; local tokens that are also summary tokens count as summary tokens. Layers 2 .. L-1.

    Args:
        alpha (float, default 0.7): local margin (the published best; warns above 0.5, where the released
            captions show heavy repetition: always report length and repetition with CHAIR).
        beta (float, default 0.4): summary margin.
        local_ratio (float, default 0.25): share of each image's (crop's) patches in the local set.
        spatial_ratio (float, default 0.0): the spatial set (vlmfix reading of v1's spatial stream): the top share of
            patches by attention *received* in the local layer (column sums), added to the local set.
        summary_rule ("tukey" | "topk_ratio", default "tukey"): Tukey fence, or the top-k patches with k
            the number of Tukey outliers (the official code's form; the same set up to ties).
        head_modulation (None | "ratio" | "top_half", default None): v1-style head-specific modulation
            (vlmfix reading; not released): per head, the margins scale with its visual share vs[h] of the
            unedited newest row, by clip(vs[h] / mean vs, 0, 2) ("ratio"), or apply only in the half of
            heads with the largest vs ("top_half").
        layers (list[int] | None, default None): boosted language-model layers; None = 2 .. L-1.
        local_layer (int, default 0): vision layer of the local (and spatial) set.
        summary_layer (int | None, default None): vision layer of the summary set; None = the layer whose
            output feeds the language model (CLIP: `vision_feature_layer`; Qwen: last full-attention block).
        selector (callable | None, default None): `selector(model, inputs) -> (local, summary)`, [batch, seq]
            bool masks over image tokens, replacing the vision-attention selection.
        cfg (bool, default True): PAI's image-free refinement (gamma, plausibility) as a batched second
            stream without the image, as in every released PAINT run; False to ablate it.
        gamma (float, default 1.1), plausibility (float, default 0.1): see `PAI`.
        skip_first_token_boost (bool, default False): leave the first generated token unboosted (PAI code).

    Vision towers without a [CLS] token (Qwen2-VL, Qwen2.5-VL) use a CLS-free substitute (vlmfix reading):
    each patch's attention *received* in vision block 0 (local) and in the last full-attention block
    (summary), averaged over query patches and heads, then over each 2x2 merge group (one score per
    language-model image token). LLaVA-NeXT: selection per crop (base view and tiles), mapped through the
    model's own packing (newline tokens are never selected).

    Papers: Arif, Dip, Hussain, Zhang, Thomas, "Fixing Imbalanced Attention to Mitigate In-Context
    Hallucination of Large Vision-Language Model", arXiv 2501.12206 v1 (dual-stream selection, head
    modulation); v3 "PAINT: Paying Attention to INformed Tokens", same id; built on PAI, arXiv 2407.21771.

    Departs from the official code: attention slices recomputed in hooks (no output_attentions), spatial
    set by column sums (the code's row sums are constant), batches and any image position, and the
    first generated token is boosted.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.DualStream(alpha=0.5, beta=0.3)],
        ...                       tokenizer=processor, max_new_tokens=24)
    """

    name = "dual_stream"
    one_token_decode = True  # last-row edits and rewrites
    needs_image = True

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.4,
        *,
        local_ratio: float = 0.25,
        spatial_ratio: float = 0.0,
        summary_rule: Literal["tukey", "topk_ratio"] = "tukey",
        head_modulation: Literal["ratio", "top_half"] | None = None,
        layers: Sequence[int] | None = None,
        local_layer: int = 0,
        summary_layer: int | None = None,
        selector: Selector | None = None,
        cfg: bool = True,
        gamma: float = 1.1,
        plausibility: float = 0.1,
        skip_first_token_boost: bool = False,
    ) -> None:
        self.alpha = check_margin(alpha, "alpha")
        self.beta = check_margin(beta, "beta")
        if self.alpha > 0.5:
            warnings.warn(
                f"DualStream alpha={self.alpha} > 0.5: the published runs at alpha 0.7 repeat sentences in "
                f"about half of their captions; report caption length and repetition next to CHAIR (alpha "
                f"<= 0.5 does not).",
                stacklevel=2,
            )
        self.local_ratio = validation.number(local_ratio, "local_ratio", low=0, high=1,
                                             meaning="the share of patches in the local set")
        self.spatial_ratio = validation.number(spatial_ratio, "spatial_ratio", low=0, high=1,
                                               meaning="the share of patches added by attention received (0 = off)")
        self.summary_rule = validation.choice(summary_rule, "summary_rule", ("tukey", "topk_ratio"))
        self.head_modulation = validation.choice(head_modulation, "head_modulation", (None, "ratio", "top_half"))
        self.layers = validation.indices(layers, "layers", meaning="None boosts layers 2 .. L-1")
        self.local_layer = validation.index(local_layer, "local_layer")
        self.summary_layer = None if summary_layer is None else validation.index(summary_layer, "summary_layer")
        self.selector: Selector | None = None if selector is None else validation.function(
            selector, "selector", "(model, inputs) -> (local, summary)")
        self.cfg, self.gamma, self.plausibility = check_refinement(cfg, gamma, plausibility)
        self.skip_first_token_boost = validation.boolean(
            skip_first_token_boost, "skip_first_token_boost", "whether the first generated token is left unboosted"
        )

    def check(self, adapter: Adapter) -> None:
        adapter.resolve_layers(self.layers)
        if self.selector is None and adapter.family not in SELECTION_FAMILIES:
            raise UnsupportedModelError(
                f"DualStream's token selection maps vision-tower attention to image tokens for "
                f"{', '.join(SELECTION_FAMILIES)} only, not {adapter.family} (another vision tower or image-token "
                f"packing); pass selector=(model, inputs) -> (local, summary) masks to run it."
            )

    # ------------------------------------------------------------------ prepare
    def prepare(self, session: Session) -> DualStreamState:
        self.require_stream_engine(session)
        adapter = session.adapter
        layers = adapter.resolve_layers(self.layers, default=pai_band(adapter.num_layers))
        inputs = session.inputs
        state = DualStreamState(
            layers=frozenset(layers),
            start=first_token_start(inputs["input_ids"], self.skip_first_token_boost),
            image=session.spans.image,
            selector_name="callable"
            if self.selector
            else (SUBSTITUTE if adapter.family.startswith("qwen") else "CLS attention"),
        )
        selector = self.selector
        if selector is not None:
            state.finish = lambda: self._check_selection(*selector(session.model, inputs), state.image)
        else:
            qwen = adapter.family.startswith("qwen")
            local_layer, summary_layer = self._vision_layers(adapter, qwen)
            probe = VisionProbe(
                layers=tuple(sorted({local_layer, summary_layer})),
                want_received=frozenset({local_layer} if self.spatial_ratio > 0 else ()),
                qwen=qwen,
            )
            probe.install(adapter.vision_tower, vision_layers_of(adapter), session.hook_for_prompt)
            state.probe = probe
            state.finish = lambda: self._select(session, probe, local_layer, summary_layer, qwen)
            if inputs.get("pixel_values") is None:
                self._encode_images_again(session)
        if self.head_modulation is not None:
            state.rewrite = LastRowRewrite(frozenset(layers))
            install_last_row_rewrite(session, state.rewrite, self._modulated_edit(state))
        return state

    def _vision_layers(self, adapter: Any, qwen: bool) -> tuple[int, int]:
        depth = len(vision_layers_of(adapter))
        summary = self.summary_layer
        if summary is None:
            if qwen:
                full = getattr(adapter.vision_tower, "fullatt_block_indexes", None)
                summary = max(full) if full else depth - 1
            else:
                feature_layer = adapter.model.config.vision_feature_layer
                feature_layer = (
                    feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
                )
                # hidden_states[k] is the output of layer k - 1; negative k counts from the end
                summary = max(0, (feature_layer % (depth + 1)) - 1)
        for name, value in (("local_layer", self.local_layer), ("summary_layer", summary)):
            if value >= depth:
                raise ValueError(
                    f"`{name}`={value}, but the vision tower has {depth} layers (0 .. {depth - 1})."
                )
        return self.local_layer, summary

    @staticmethod
    def _encode_images_again(session: Session) -> None:
        """The images were encoded before the prefill (transformers' generate does so): encode them again,
        with the probe's hooks on, from the call's recorded image inputs."""
        image_inputs = session.image_inputs
        if not image_inputs:
            raise VlmfixError(
                "DualStream selects tokens from the vision tower's attention, but the images were encoded "
                "before vlmfix saw the prompt (transformers' generate pre-encodes them) and the session has "
                "no record of the image inputs. Call session.generate(**inputs) inside vlmfix.apply (or "
                "vlmfix.generate), which records them, or pass selector=..."
            )
        encoder = session.model.base_model.get_image_features
        accepted = set(inspect.signature(encoder).parameters) - {"kwargs"}
        with torch.no_grad():
            encoder(**{k: v for k, v in image_inputs.items() if k in accepted})

    # ------------------------------------------------------------------ selection
    def _select(
        self, session: Session, probe: VisionProbe, local_layer: int, summary_layer: int, qwen: bool
    ) -> tuple[Tensor, Tensor]:
        if probe.calls == 0 or set(probe.layers) - set(probe.captures):
            raise VlmfixError(
                "DualStream found no vision tower forward for this prompt; it needs the images "
                "encoded with the model's vision tower (pixel_values)."
            )
        adapter = session.adapter
        if qwen:
            units = qwen_units(probe, adapter.vision_tower, local_layer, summary_layer)
        else:
            units = clip_units(probe, local_layer, summary_layer, self.spatial_ratio > 0)
        picks = [self._pick(unit) for unit in units]  # per unit: (local, summary) over its tokens
        if adapter.family == "llava_next":
            local_flat, summary_flat = self._pack_next(session, picks)
        else:
            cls_slot = not qwen and session.model.config.vision_feature_select_strategy == "full"
            local_flat = torch.cat([_with_cls(lo, cls_slot) for lo, _ in picks])
            summary_flat = torch.cat([_with_cls(su, cls_slot) for _, su in picks])
        return _scatter(local_flat, summary_flat, session.spans.image)

    def _pick(self, unit: UnitScores) -> tuple[Tensor, Tensor]:
        n = unit.local.numel()
        local = top_k_mask(unit.local, math.floor(self.local_ratio * n))
        if self.spatial_ratio > 0 and unit.spatial is not None:
            local |= top_k_mask(unit.spatial, math.floor(self.spatial_ratio * n))
        summary = tukey_mask(unit.summary)
        if self.summary_rule == "topk_ratio":
            summary = top_k_mask(unit.summary, int(summary.sum()))
        return local & ~summary, summary

    @staticmethod
    def _pack_next(session: Session, picks: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """LLaVA-NeXT: per-crop picks -> image tokens, through the model's own packing (unpad, newline)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        model = session.model
        image_sizes = session.inputs.get("image_sizes")
        if image_sizes is None:
            image_sizes = session.image_inputs.get("image_sizes")
        if image_sizes is None:
            raise VlmfixError(
                "DualStream on LLaVA-NeXT needs the prompt's image_sizes to place each crop's tokens."
            )
        config = model.config
        crops = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in image_sizes
        ]
        # code per patch: 1 local, 2 summary, 0 neither; newline tokens get -1
        codes = torch.stack([lo.float() + 2 * su.float() for lo, su in picks])[..., None]  # [crops, N, 1]
        packed, _ = model.model.pack_image_features(
            list(codes.split(crops)), image_sizes, "default", image_newline=torch.full((1,), -1.0)
        )
        flat = torch.cat(packed)[:, 0]
        return flat == 1, flat == 2

    @staticmethod
    def _check_selection(local: Tensor, summary: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        for name, mask in (("local", local), ("summary", summary)):
            if mask.shape != image.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"selector's {name} mask must be bool of shape {tuple(image.shape)} (batch, seq), "
                    f"got {mask.dtype} {tuple(mask.shape)}."
                )
            if (mask & ~image.to(mask.device)).any():
                raise ValueError(f"selector's {name} mask marks tokens that are not image tokens.")
        return local & ~summary, summary

    # ------------------------------------------------------------------ generation
    def _ready(self, state: DualStreamState) -> None:
        if state.local is not None:
            return
        assert state.finish is not None  # set by prepare
        local, summary = state.finish()
        state.local, state.summary = local.to(state.image.device), summary.to(state.image.device)
        gain = (self.alpha * state.local.float() + self.beta * state.summary.float())[
            :, None
        ]  # [batch, 1, seq]
        state.edit = KeyBias(abs_gain=gain, rows="last", from_position=state.start)
        positions = [state.image[b].nonzero().flatten() for b in range(state.image.shape[0])]
        state.info = {
            "rows": [
                {
                    "image_tokens": int(pos.numel()),
                    "local_tokens": state.local[b, pos].nonzero().flatten().tolist(),
                    "summary_tokens": state.summary[b, pos].nonzero().flatten().tolist(),
                }
                for b, pos in enumerate(positions)
            ]
        }

    def _modulated_edit(self, state: DualStreamState) -> Callable[[int, Tensor], Edit]:
        mode = self.head_modulation

        def make(layer_idx: int, probs: Tensor) -> Edit:
            # probs: [batch, heads, 1, kv_len], the unedited newest row
            p = probs[:, :, 0]
            batch, heads, kv_len = p.shape
            rows = state.image.shape[0]
            image = fit_keys(state.image, kv_len, rows, False)[:batch, None].to(p.device)  # [batch, 1, kv_len]
            share = (p * image).sum(-1)  # [batch, heads] visual share vs[h]
            if mode == "ratio":
                mean = share.mean(-1, keepdim=True)
                factor = torch.where(
                    mean > 0, (share / mean.clamp_min(1e-30)).clamp(0, 2), torch.ones_like(share)
                )
            else:
                factor = torch.zeros_like(share)
                factor.scatter_(1, share.topk(heads // 2, dim=1).indices, 1.0)
            assert state.edit is not None and state.edit.abs_gain is not None  # made by _ready before any edit
            base = fit_keys(state.edit.abs_gain[:, 0], kv_len, rows, 0.0).to(p.device)[:batch]  # [batch, kv_len]
            return KeyBias(abs_gain=factor[..., None] * base[:, None], rows="last", from_position=state.start)

        return make

    def edits(self, state: DualStreamState, layer_idx: int) -> Sequence[Edit]:
        self._ready(state)
        if layer_idx not in state.layers:
            return ()
        if state.rewrite is not None:
            state.rewrite.arm(layer_idx)
            return ()
        assert state.edit is not None  # made by _ready
        return (state.edit,)

    def report(self, state: DualStreamState) -> dict[str, Any]:
        """Per row: the image-token indices (0 .. n-1 within the row's image tokens) selected as local and
        summary tokens; the selector used, margins and layers."""
        if state.local is None:
            return {"prepared": True, "selected": False}
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "layers": sorted(state.layers),
            "selector": state.selector_name,
            "head_modulation": self.head_modulation,
            **state.info,
        }


def _with_cls(mask: Tensor, cls_slot: bool) -> Tensor:
    return torch.cat([mask.new_zeros(1), mask]) if cls_slot else mask


def _scatter(local_flat: Tensor, summary_flat: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token picks of every image, in order, onto the image tokens of the batch (row-major, as the
    model places image features); rows repeated for beams get their original row's picks."""
    total = int(image.sum())
    if local_flat.numel() == total:
        local, summary = torch.zeros_like(image), torch.zeros_like(image)
        local[image] = local_flat.to(image.device)
        summary[image] = summary_flat.to(image.device)
        return local, summary
    times = total // max(local_flat.numel(), 1)
    if times > 1 and total == times * local_flat.numel() and image.shape[0] % times == 0:
        base_local, base_summary = _scatter(local_flat, summary_flat, image[::times])
        return base_local.repeat_interleave(times, 0), base_summary.repeat_interleave(times, 0)
    raise VlmfixError(
        f"DualStream scored {local_flat.numel()} image tokens, but the prompt batch has {total}; "
        f"the vision tower's images do not match the prompts' image tokens."
    )
