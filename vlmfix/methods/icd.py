"""ICD: contrast each step's logits with those of the same image under a disturbed instruction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.contrastive import ContrastiveMethod, require_engine
from vlmfix.decoding.method import register_method
from vlmfix.decoding.prompt_inputs import IMAGE_KEYS, Splice, pad_token_id, padding_mask, splice_rows
from vlmfix.methods.contrast import check_alpha, check_beta, contrast_logits, count_changed_tops

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

# the five role prefixes of the official scripts, verbatim (icd_llava_pope.py L117-122)
ICD_PROMPTS = (
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
)
Placement = Literal["system", "after_image"]
PLACEMENTS = ("system", "after_image")


@dataclass
class ICDState:
    """Per call: each row's splice (None: the row is not disturbed), and per row the steps whose top token the
    contrast changed."""

    splices: list[Splice | None]
    changed_top_token: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.changed_top_token = [0] * len(self.splices)


@register_method
class ICD(ContrastiveMethod):
    """Instruction Contrastive Decoding: score each token by (1 + alpha) * l - alpha * l_d, where l_d comes from
    the same image under a disturbed instruction (a role prefix such as "You are a confused objects detector ..."),
    keeping only tokens plausible under the plain prompt.

    Both streams run as one batched forward per step (rows [plain; disturbed], separate cache rows). The disturbed
    prompt is built on token ids: the disturbance's tokens are spliced into each row at the placement's anchor
    (the adapter finds it), the rows are left-padded again and their positions (Qwen's M-RoPE included) follow the
    new sequence. The contrast applies in every decoding mode (greedy, sampling, beams). Needs the tokenizer
    (`tokenizer=processor`).

    Args:
        alpha (float, default 1.0): contrast strength, >= 0 (0 = plain decoding of the plain stream).
        beta (float | None, default 0.1): adaptive plausibility cutoff in (0, 1]: tokens with
            p(j | plain prompt) < beta * max p are removed; None switches it off.
        disturbance (str, default `ICD_PROMPTS[3]`): the role prefix; `ICD_PROMPTS` holds the official five.
            "" disturbs nothing (both streams see the same prompt).
        placement ("system" | "after_image", default "system"): "system" puts the disturbance in the system
            slot, replacing any system text (LLaVA: after BOS, before `USER:`; Qwen: the system message's text,
            adding the message when the prompt has none), as the official LLaVA code does; "after_image" inserts
            it right after the image (`USER: <image> d <question>`), as SID's re-implementation does.
        negative_inputs (processor output | None, default None): the disturbed prompts built by the caller
            (`processor(text=disturbed_prompts, images=the same images, ...)`, one row per prompt of the call):
            they replace the splice, and `disturbance` / `placement` are not used. Each row must hold the same
            image tokens as its prompt and may differ from it in the text on one side of the image only (the
            system slot, the question, ...); its positions (Qwen's M-RoPE included) are laid out as for a splice.
            `pixel_values` / `image_grid_thw` may be left out (the call's are used); if given, they must equal the
            call's. An instance holding negative_inputs serves the calls of that prompt batch only.

    Paper: Wang, Pan, Ding, Biemann, "Mitigating Hallucinations in Large Vision-Language Models with Instruction
    Contrastive Decoding", Findings of ACL 2024, arXiv 2403.18715 (the LLM-prompt variant; the Q-Former variant
    for InstructBLIP / MiniGPT-4 is not offered: no supported model has an instruction-aware fusion module).
    Departs from the official code: greedy and beams apply the contrast too (the code only patched sampling), and
    the disturbed prompt is spliced on token ids per row of a batch instead of being rebuilt from a conversation
    template at batch size 1 (or taken from the caller, `negative_inputs`). alpha is the scripts' 1.0 (not the
    sampler's 0.5 fallback); one string per call (the scripts ran all five on the test set).

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.ICD(alpha=1.0)], tokenizer=processor,
        ...                       max_new_tokens=20)
    """

    name = "icd"
    needs_image = True
    needs_tokenizer = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float | None = 0.1,
        *,
        disturbance: str = ICD_PROMPTS[3],
        placement: Placement = "system",
        negative_inputs: Mapping[str, Any] | None = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.beta = check_beta(beta, "beta")
        self.disturbance = validation.text(disturbance, "disturbance", allow_empty=True,
                                           meaning="the role prefix of the disturbed prompt (vlmfix.methods.icd."
                                           "ICD_PROMPTS holds the official five; '' disturbs nothing)")
        self.placement = validation.choice(placement, "placement", PLACEMENTS,
                                           "where the disturbance goes: the system slot or right after the image")
        # not `self.negative_inputs`: that name is the engine's hook below
        self._supplied_negative = None if negative_inputs is None else _checked_negative_inputs(negative_inputs)

    def prepare(self, session: Session) -> ICDState:
        require_engine(session, self)
        return ICDState(self._splices(session, session.inputs["input_ids"], session.inputs.get("attention_mask")))

    def _splices(self, session: Session, input_ids: Tensor, attention_mask: Tensor | None) -> list[Splice | None]:
        """Each row's splice of the disturbance (None for every row when the disturbance is empty), or of the
        caller's negative prompt."""
        valid = padding_mask(attention_mask, input_ids)  # [B, S]
        rows = [ids[keep].tolist() for ids, keep in zip(input_ids, valid)]
        if self._supplied_negative is not None:
            return self._supplied_splices(session, rows, self._supplied_negative)
        if not self.disturbance.strip():
            return [None] * len(rows)
        adapter, tokenizer = session.adapter, session.tokenizer
        splice = adapter.system_splice if self.placement == "system" else adapter.after_image_splice
        return [splice(row, self.disturbance, tokenizer) for row in rows]

    def _supplied_splices(self, session: Session, rows: list[list[int]], negative: dict[str, Tensor]
                          ) -> list[Splice | None]:
        """Each row's difference from its caller-built negative prompt, as one splice (None: the same prompt).

        Raises before any forward pass (the engine asks `negative_growth` before `generate`) when the rows do
        not pair up with the call's prompts or the images differ."""
        ids = negative["input_ids"]  # [B0, S_neg]
        caller = session.call_inputs.get("input_ids", session.call_inputs.get("inputs"))
        prompts = caller.shape[0] if isinstance(caller, Tensor) else len(rows)
        if ids.shape[0] != prompts or len(rows) % prompts:
            raise ValueError(f"ICD's negative_inputs has {ids.shape[0]} rows, but the call has {prompts} prompts. "
                             "Give one negative prompt per prompt, in the same order (the processor's output for "
                             "the batch's disturbed prompts).")
        for key in IMAGE_KEYS:
            given, called = negative.get(key), session.call_inputs.get(key)
            if given is not None and not (isinstance(called, Tensor) and given.shape == called.shape
                                          and torch.equal(given.to(called.device), called)):
                raise ValueError(f"ICD's negative_inputs[{key!r}] differs from the call's {key}: ICD keeps the image "
                                 "and disturbs the instruction only. Build negative_inputs with the same images, or "
                                 f"leave {key} out (the call's images are used).")
        valid = padding_mask(negative.get("attention_mask"), ids)
        negative_rows = [row[keep].tolist() for row, keep in zip(ids, valid)]
        expand = len(rows) // prompts  # generate repeats each prompt for its beams / return sequences
        return [_row_splice(session, b, row, negative_rows[b // expand]) for b, row in enumerate(rows)]

    def negative_growth(self, session: Session, input_ids: Tensor, attention_mask: Tensor | None) -> int:
        valid = padding_mask(attention_mask, input_ids)  # [B0, S]
        lengths = [int(n) + (0 if s is None else len(s.tokens) - (s.end - s.start))
                   for n, s in zip(valid.sum(dim=1), self._splices(session, input_ids, attention_mask))]
        return max(0, max(lengths) - input_ids.shape[1])

    def negative_inputs(self, session: Session, state: ICDState) -> dict[str, Any]:
        adapter = session.adapter
        pad = pad_token_id(session.tokenizer, session.model, adapter.text_config, avoid=adapter.image_token_id)
        return splice_rows(session.inputs, state.splices, pad)

    def combine(self, state: ICDState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        scores = contrast_logits(positive_logits, negative_logits, self.alpha, self.beta)
        count_changed_tops(scores, positive_logits, state.changed_top_token)
        return scores

    def report(self, state: ICDState) -> dict[str, Any]:
        """The settings, per row the disturbed span (replaced tokens, inserted tokens; None: not disturbed) and
        the steps whose top token the contrast changed (0 everywhere: the contrast decided nothing)."""
        supplied = self._supplied_negative is not None
        return {
            "alpha": self.alpha, "beta": self.beta,
            "negative_inputs": supplied,  # True: the caller's negative prompts replaced the splice
            "placement": None if supplied else self.placement, "disturbance": None if supplied else self.disturbance,
            "replaced_tokens": [None if s is None else s.end - s.start for s in state.splices],
            "inserted_tokens": [None if s is None else len(s.tokens) for s in state.splices],
            "changed_top_token": list(state.changed_top_token),
        }

    def params(self) -> dict[str, Any]:
        """The parameters; caller-built negative prompts as their tensors' shapes."""
        params = super().params()
        if self._supplied_negative is not None:
            params["negative_inputs"] = {k: list(v.shape) for k, v in self._supplied_negative.items()}
        return params


def _checked_negative_inputs(value: Any) -> dict[str, Tensor]:
    """The negative prompts' token ids, padding mask and image tensors from a processor output."""
    ids = value.get("input_ids") if isinstance(value, Mapping) else None
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"`negative_inputs` must be the processor's output for the disturbed prompts (a mapping with "
                         f"integer input_ids of shape [batch, seq]), got {validation.with_type(value)}; pass "
                         "negative_inputs=processor(text=disturbed_prompts, images=images, return_tensors='pt').")
    out = {"input_ids": ids}
    mask = value.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            raise ValueError(f"`negative_inputs['attention_mask']` must be a tensor of input_ids' shape "
                             f"{tuple(ids.shape)}, got {validation.with_type(mask)}.")
        out["attention_mask"] = mask
    out.update({k: value[k] for k in IMAGE_KEYS if isinstance(value.get(k), Tensor)})
    return out


def _row_splice(session: Session, row_index: int, row: Sequence[int], negative: Sequence[int]) -> Splice | None:
    """The splice that turns one prompt row into its negative row (their common prefix and suffix kept), or None
    when they are the same; raises when they differ in image tokens or on both sides of the image."""
    if list(row) == list(negative):
        return None
    shortest = min(len(row), len(negative))
    prefix = next((i for i in range(shortest) if row[i] != negative[i]), shortest)
    suffix = next((i for i in range(shortest - prefix) if row[-1 - i] != negative[-1 - i]), shortest - prefix)
    splice = Splice(prefix, len(row) - suffix, tuple(negative[prefix : len(negative) - suffix]))
    changed = torch.tensor([[*row[splice.start : splice.end], *splice.tokens]])
    if bool(session.adapter.image_mask(changed).any()):
        raise ValueError(
            f"ICD's negative_inputs row {row_index} does not hold the same image tokens as its prompt in the same "
            f"place: the two differ from token {prefix} of the prompt to token {splice.end - 1}, across image "
            f"tokens. ICD keeps the image: build the negative prompt from the same images and change the text on "
            f"one side of the image only (the system slot, or the question)."
        )
    return splice
