"""VHR: reinforce the attention heads whose output depends most on the image.

Paper: He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
arXiv 2412.13949 (v3 / ACL 2025), Sec. 3.1 (VHD, Eq. 4), Sec. 3.2 (VHR, Eq. 6-7), Sec. 4.4 (defaults).
Spec: shared/specs/vhr.md.

At the first step VHR runs one extra forward of 2B rows, [image rows; the same prompts without their
image span], and scores every query head of every reinforced layer by the L2 distance between its
output with and without the image at the last prompt position (VHD). Per row and layer it zeroes
"negative-sensitivity" outliers (VHD and the no-image output norm both above mean + std), keeps the
heads above the median, and multiplies their outputs by `alpha` in both branches before the next layer
is scored (lockstep). The head set is then frozen: during generation the chosen heads' outputs are
scaled by `alpha` before `o_proj` at every position, prefill and decode (a `HeadScale` edit, so SDPA
or flash attention stays in use).

Departs from the official code (jinghan1he/VHR): no monkeypatched Llama attention or generation loop,
per-row spans and head sets for batches with left padding, and the scoring pass uses none of the other
session methods' edits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.adapters import Adapter
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import Edit, HeadScale
from vlmfix.decoding.method import Method, register_method
from vlmfix.decoding.prompt_inputs import pad_token_id, stack_row_blocks, without_loop_keys

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

Distance = Literal["l2", "sq_l2"]
NullInput = Literal["drop_span", "drop_placeholders_only"]
Selection = Literal["lockstep", "two_pass"]

LAST_LAYERS = 14  # rule R1: layer 1 plus the last 14 layers (official CLI `--vhr_layer1 --vhr_layers 14`)
PUBLISHED_DEPTHS = {("llava", 32), ("llava_next", 32)}  # LLaVA-1.5-7B and LLaVA-NeXT-7B, [P] Sec. 4.4


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Rule R1: {1} plus the last 14 layers (0-based), clipped to the model's depth."""
    last = range(max(0, num_layers - LAST_LAYERS), num_layers)
    return tuple(sorted({*last, *([1] if num_layers > 1 else [])}))


def two_branch_inputs(session: Session, null_input: NullInput = "drop_span") -> dict[str, Any]:
    """Forward kwargs of the 2B-row batch [image rows; the same rows without their image].

    The no-image rows delete the image placeholders (and, with "drop_span", the family's image
    delimiters such as Qwen's <|vision_start|>/<|vision_end|>) and are left-padded to the image rows'
    width; their positions follow from their own attention mask, as for the text prompt alone. The
    image rows keep every input of the prompt's forward (image features, M-RoPE positions).
    """
    inputs, adapter = session.inputs, session.adapter
    pad = pad_token_id(session.tokenizer, session.model, adapter.text_config, avoid=adapter.image_token_id)
    text = adapter.without_image(inputs, pad, drop_frames=null_input == "drop_span",
                                 width=inputs["input_ids"].shape[1])
    return stack_row_blocks(without_loop_keys(inputs), text, pad_token_id=pad)


@dataclass(frozen=True)
class LayerScores:
    """One layer's scoring at the first step, per row: all [batch, heads]."""

    vhd: Tensor  # fp32, before the outlier filter
    outliers: Tensor  # bool, zeroed by the filter (Eq. 6)
    chosen: Tensor  # bool, above the per-row median of the filtered VHD (Eq. 7)


@dataclass(frozen=True)
class VHRState:
    """Per prompt batch: the frozen plan (`scores[layer].chosen`) and the edit that applies it."""

    layers: tuple[int, ...]
    layers_source: str
    scores: dict[int, LayerScores]
    edits: dict[int, HeadScale]


@register_method
class VHR(Method):
    """Scale the outputs of the most vision-sensitive attention heads by `alpha` before `o_proj`.

    Args:
        alpha (float, default 2.0): head output multiplier, > 0; above 3 captions grow long ([P] Table 6).
            1.0 keeps the model's output while still reporting the head scores.
        layers (Sequence[int] | None, default None): 0-based decoder layers to reinforce. None: rule R1,
            layer 1 plus the last 14 layers (published for 32-layer LLaVA-1.5/NeXT-7B: {1, 18..31}).
        outlier_filter (bool, default True): zero heads whose VHD and no-image output norm are both
            above mean + std over the layer's heads ([P] Eq. 6).
        std_unbiased (bool, default False): sample instead of population std in the filter.
        distance ("l2" | "sq_l2", default "l2"): VHD as L2 distance ([P] Eq. 4) or squared L2 (ports).
        null_input ("drop_span" | "drop_placeholders_only", default "drop_span"): what the no-image branch
            deletes: the image placeholders and the family's image delimiters, or the placeholders only.
        selection ("lockstep" | "two_pass", default "lockstep"): score each layer with earlier layers
            already reinforced in both branches ([P] Sec. 3.2), or score every layer on the unreinforced
            model (the ablation of independent passes).
        scale_null_branch (bool, default True): reinforce the no-image branch too while scoring.

    Per prompt batch: one extra forward of 2B rows (no KV cache); then one elementwise multiply per
    reinforced layer and step. Per-row head sets, so left-padded batches give each row its own plan.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> with vlmfix.apply(model, vlmfix.VHR(alpha=2.0)) as session:
        ...     out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        >>> heads = session.report()["vhr"]["rows"][0]["layers"]  # chosen heads and VHD per layer
    """

    name = "vhr"
    needs_image = True

    def __init__(
        self,
        alpha: float = 2.0,
        layers: Sequence[int] | None = None,
        outlier_filter: bool = True,
        std_unbiased: bool = False,
        distance: Distance = "l2",
        null_input: NullInput = "drop_span",
        selection: Selection = "lockstep",
        scale_null_branch: bool = True,
    ) -> None:
        self.alpha = validation.number(alpha, "alpha", low=0, low_open=True, meaning="the multiplier of the chosen "
                                       "heads' outputs (2.0 is the paper's default, 1.0 leaves the model unchanged)")
        if self.alpha > 3:
            warnings.warn(f"VHR alpha={alpha} is above 3: the paper reports broken generation at alpha=4.",
                          stacklevel=2)
        layers = validation.indices(layers, "layers", meaning="None takes rule R1 ({1} + the last 14 layers)")
        self.layers = None if layers is None else tuple(sorted(layers))
        self.outlier_filter = validation.boolean(outlier_filter, "outlier_filter")
        self.std_unbiased = validation.boolean(std_unbiased, "std_unbiased")
        self.distance = validation.choice(distance, "distance", ("l2", "sq_l2"))
        self.null_input = validation.choice(null_input, "null_input", ("drop_span", "drop_placeholders_only"))
        self.selection = validation.choice(selection, "selection", ("lockstep", "two_pass"))
        self.scale_null_branch = validation.boolean(scale_null_branch, "scale_null_branch")

    # ------------------------------------------------------------------ plan
    def check(self, adapter: Adapter) -> None:
        adapter.resolve_layers(self.layers)

    def resolve_layers(self, adapter: Adapter) -> tuple[tuple[int, ...], str]:
        """The reinforced layers for this model and where they come from."""
        depth = adapter.num_layers
        if self.layers is not None:
            return adapter.resolve_layers(self.layers), "given"
        if (adapter.family, depth) in PUBLISHED_DEPTHS:
            return default_layers(depth), "published: {1} + last 14 of 32 layers ([P] Sec. 4.4)"
        return default_layers(depth), f"rule R1: {{1}} + last {LAST_LAYERS} layers (not published for this model)"

    def score(self, with_image: Tensor, without_image: Tensor) -> LayerScores:
        """Score heads from their outputs at the last prompt position: both [batch, heads, head_dim]."""
        a_img, a_txt = with_image.float(), without_image.float()
        vhd = (a_img - a_txt).norm(dim=-1)  # [batch, heads], Eq. 4
        if self.distance == "sq_l2":
            vhd = vhd.square()
        outliers = torch.zeros_like(vhd, dtype=torch.bool)
        if self.outlier_filter:
            text_norm = a_txt.square().sum(-1)  # [batch, heads], Eq. 6 (squared norm)
            correction = 1 if self.std_unbiased else 0

            def above(x: Tensor) -> Tensor:
                return x > x.mean(-1, keepdim=True) + x.std(-1, correction=correction, keepdim=True)

            outliers = above(vhd) & above(text_norm)
        filtered = vhd.masked_fill(outliers, 0.0)
        chosen = filtered > filtered.median(dim=-1, keepdim=True).values  # lower middle for even heads
        return LayerScores(vhd=vhd, outliers=outliers, chosen=chosen)

    def head_scale(self, chosen: Tensor) -> Tensor:
        """[batch, heads] bool -> [batch, heads] fp32 multipliers."""
        return torch.where(chosen, torch.tensor(self.alpha), torch.tensor(1.0)).to(chosen.device)

    def prepare(self, session: Session) -> VHRState:
        layers, source = self.resolve_layers(session.adapter)
        batch = session.inputs["input_ids"].shape[0]
        wanted = set(layers)
        scores: dict[int, LayerScores] = {}

        def observe(call: AttentionCall) -> Tensor | None:
            out = call.output  # [2 * batch, seq, heads, head_dim], before o_proj
            if call.layer_idx not in wanted or out.shape[0] != 2 * batch:
                return None
            found = self.score(out[:batch, -1], out[batch:, -1])
            scores[call.layer_idx] = found
            if self.selection == "two_pass":
                return None
            scale = self.head_scale(found.chosen)
            other = scale if self.scale_null_branch else torch.ones_like(scale)
            factor = torch.cat([scale, other]).to(out.dtype)  # [2 * batch, heads]
            return out * factor[:, None, :, None]

        with session.observing(observe):
            session.forward(two_branch_inputs(session, self.null_input), with_edits=False)
        missing = wanted - set(scores)
        if missing:
            raise RuntimeError(f"VHR's scoring pass never reached layers {sorted(missing)}; the model's attention "
                               f"did not go through vlmfix's attention function.")
        edits = {layer: HeadScale(scale=self.head_scale(scores[layer].chosen)) for layer in layers}
        return VHRState(layers=layers, layers_source=source, scores=scores, edits=edits)

    def edits(self, state: VHRState, layer_idx: int) -> Sequence[Edit]:
        edit = state.edits.get(layer_idx)
        return (edit,) if edit is not None else ()

    def report(self, state: VHRState) -> dict[str, Any]:
        """Reinforced layers, and per row and layer: chosen heads, zeroed outliers, VHD of every head."""
        batch = next(iter(state.scores.values())).vhd.shape[0]
        rows = []
        for b in range(batch):
            per_layer = {}
            for layer in state.layers:
                s = state.scores[layer]
                per_layer[layer] = {
                    "heads": s.chosen[b].nonzero().flatten().tolist(),
                    "outliers": s.outliers[b].nonzero().flatten().tolist(),
                    "vhd": s.vhd[b].tolist(),
                    "vhd_median": float(s.vhd[b].median()),
                }
            rows.append({"layers": per_layer})
        return {"alpha": self.alpha, "selection": self.selection, "layers": list(state.layers),
                "layers_source": state.layers_source, "rows": rows}
