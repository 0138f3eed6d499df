"""The contrastive stage: two streams in one batched forward, one token for both (VCD, DCD, PAI's CFG).

Layout of every contrastive forward: rows 0 … B-1 are the positive (clean) stream, rows B … 2B-1 the
negative stream, where B is the batch `model.generate` works on (already expanded for beams and
`num_return_sequences`). Each stream has its own KV-cache rows. The method's `combine` turns the two
streams' next-token logits, given the step's index (tokens generated so far), into B rows of scores;
`generate`'s own logits processors, warpers, token choice (greedy, sampling, beams), stopping criteria
and streamers run on those B rows, and the chosen token is fed to both halves.

How (public extension points only): `generate_contrastive` runs `model.generate` unchanged, with
  - a forward pre-hook on the model that, at the prefill, asks the method for the negative stream's
    inputs (`negative_inputs`), stacks them under the positive ones (left padding both to one width),
    and at every decode step feeds the new token to both halves with each half's own mask and
    positions;
  - a forward hook that splits the 2B rows of logits, checks the layout and returns `combine`'s B rows;
  - a `StreamPairCache` (a `DynamicCache`) whose beam reordering moves both halves with the same
    indices.
Edits of the session's attention methods touch the positive rows only (`session.edited_rows = B`)
unless the method sets `edit_negative = True`. They are planned in the positive prompt's padded
coordinates, so the stacked batch must not be wider than the positive prompts: a method whose negative
rows are longer (ICD's disturbed instruction) says by how much (`negative_growth`), and the engine
left-pads the caller's prompts by that much before `generate` (and cuts it from the returned sequences).

Images: transformers >= 5.x `generate` encodes the images (vision tower + projector) *before* the first
forward and passes the features as `mm_encoder_outputs`; the prefill forward sees no `pixel_values`.
A method's negative stream therefore names its images in one of two ways:
  - `pixel_values` (with `image_sizes` / `image_grid_thw`) in the caller's layout, i.e. as passed to
    `generate` (`session.image_inputs`), before beam expansion: the engine encodes them with the
    model's `get_image_features` and expands them to the B rows (VCD: noised pixels);
  - `mm_encoder_outputs` in the forward's layout (B rows), e.g. from `encode_images` (DCD: the same
    pixels through another projector).
Rows without image tokens (PAI's image-free stream) get no image features.

Contrastive methods need `vlmfix.generate(model, methods=[...], ...)`; inside a bare `vlmfix.apply`
block `model.generate` would decode one stream only, so their `prepare` raises (`require_engine`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from vlmfix.decoding.method import Method
from vlmfix.decoding.prompt_inputs import (
    FEATURES,
    IMAGE_KEYS,
    TOKEN_TYPE_KEYS,
    left_pad,
    pad_token_id,
    repeat_image_groups,
    stack_row_blocks,
)
from vlmfix.decoding.trace import ContrastTrace
from vlmfix.errors import PaddedBatchError, SessionError

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

# generate() arguments the engine cannot honour, with the reason
UNSUPPORTED = {
    "custom_generate": "the contrastive engine already runs generate's own decoding loop",
    "assistant_model": "assisted decoding proposes tokens from a single stream",
    "prefill_chunk_size": "a chunked prefill cannot split the image inputs of both streams",
    "cache": "the engine keeps its own paired cache (one row per stream)",
    "past_key_values": "the engine keeps its own paired cache (one row per stream)",
    "cache_implementation": "the engine keeps its own paired dynamic cache",
    "pixel_values_videos": "video inputs are not supported by the contrastive engine",
    "inputs_embeds": "the streams are built from input_ids",
    "image_patches": "Fuyu's legacy patch key is not what generate encodes; call the processor with "
                     "return_legacy_image_output=False, so the patches come as pixel_values",
}


class ContrastiveMethod(Method):
    """A method that decodes from two streams in one batch: subclasses provide the negative stream's
    inputs and the rule that combines the two streams' logits.

    Class attributes:
        contrastive: True (`session.generate` routes to `generate_contrastive`).
        edit_negative: whether the attention edits of the session's methods also apply to the negative
            rows (False: only rows 0 … B-1 are edited).
    """

    contrastive: ClassVar[bool] = True
    edit_negative: ClassVar[bool] = False

    def negative_inputs(self, session: Session, state: Any) -> dict[str, Any]:
        """The negative stream's model inputs for the same B prompts, as a dict like `session.inputs`.

        Called once per prompt batch, right before the prefill forward of both streams. Keys missing
        here are filled from the positive stream where the prompts are the same. Images: see the module
        docstring (`pixel_values` in the caller's layout, or `mm_encoder_outputs` for the B rows).
        """
        raise NotImplementedError

    def combine(self, state: Any, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        """[B, vocab] scores from the two streams' raw next-token logits ([B, vocab] each, fp32).

        `step` is the number of tokens generated before this one (0 at the prefill), the same for every
        row since all rows decode in lockstep; rules that change over the answer (M3ID) read it.
        """
        raise NotImplementedError

    def positive_inputs(self, session: Session, state: Any) -> dict[str, Any] | None:
        """Optional: keys that replace the positive stream's prefill inputs (same image rules as
        `negative_inputs`); None keeps them. Called before `negative_inputs`."""
        return None

    def negative_growth(self, session: Session, input_ids: Tensor, attention_mask: Tensor | None) -> int:
        """How many tokens wider than the caller's prompt batch ([B0, S] `input_ids`) the negative rows will be
        (0: not wider). The engine then left-pads the caller's prompts by that much before `generate`, so the
        edits and observers that methods plan on the positive prompt (in its padded coordinates) stay aligned
        when both blocks are padded to one width; the padding is cut from the returned sequences."""
        return 0

    def two_streams(self, state: Any) -> bool:
        """Whether this call decodes two streams (False: the positive stream alone, e.g. DCD pos-only)."""
        return True


def split_streams(logits: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Split [2B, ...] logits into the positive rows (0 … B-1) and the negative rows (B … 2B-1)."""
    if logits.shape[0] != 2 * batch:
        raise ValueError(
            f"contrastive logits must have 2*B = {2 * batch} rows for B = {batch} prompts (layout: rows "
            f"0..{batch - 1} positive/clean stream, rows {batch}..{2 * batch - 1} negative stream), got "
            f"{logits.shape[0]} rows. Feed both streams in one batch, positive rows first."
        )
    return logits[:batch], logits[batch:]


class StreamPairCache(DynamicCache):
    """A `DynamicCache` holding [positive rows; negative rows]: beam search's reordering, given for
    the B positive rows, moves the negative rows with the same indices."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # beam_idx: [B] indices into the positive rows
        batch = beam_idx.shape[0]
        super().reorder_cache(cast(torch.LongTensor, torch.cat([beam_idx, beam_idx + batch])))


def require_engine(session: Session, method: Method) -> None:
    """Raise unless `session` is decoding through `generate_contrastive` (call from `prepare`)."""
    if session.engine is None:
        raise SessionError(
            f"{type(method).__name__} is a two-stream method: call session.generate(**inputs) inside "
            f"vlmfix.apply (or vlmfix.generate(model, methods=[...], ...)). A bare model.generate would decode "
            f"the positive stream only."
        )


def negative_rows(session: Session) -> slice | None:
    """The batch rows of the negative stream in the forward running now: rows B..2B-1 during the
    engine's own two-stream forwards on the session's thread, None otherwise (no engine, one stream, a
    method's extra pass, or another thread's forward)."""
    start = session.negative_start()
    return None if start is None else slice(start, None)


@torch.no_grad()
def encode_images(session: Session, image_inputs: dict[str, Any]) -> dict[str, Any]:
    """`mm_encoder_outputs` ({"image": output}) for the current B rows from caller-layout image inputs.

    Runs the model's `get_image_features` (vision tower + projector, as `generate` does before the
    prefill) on `image_inputs` (missing image keys come from the caller's inputs), then repeats each
    prompt's image group for its beams / return sequences, as `generate` does.
    """
    engine = session.engine
    encoder = session.model.base_model.get_image_features
    available = {**session.image_inputs, **image_inputs}
    wanted = {k: v for k, v in available.items()
              if k in inspect.signature(encoder).parameters and k != "kwargs" and v is not None}
    output = encoder(**wanted, return_dict=True)
    return {"image": repeat_image_groups(output, session.adapter.image_mask(engine.caller_ids), engine.expand)}


# ---------------------------------------------------------------------------------------------- engine
def generate_contrastive(session: Session, **generate_kwargs: Any) -> Any:
    """`model.generate(**generate_kwargs)` with the session's one contrastive method deciding each token
    from both streams; returns exactly what `model.generate` returns.

    With `return_dict_in_generate=True`, `logits` holds the combined scores (before processors) and
    `past_key_values` the paired cache (rows [positive; negative]).
    """
    contrastive = [(i, m) for i, m in enumerate(session.methods) if m.contrastive]
    if len(contrastive) != 1:
        raise ValueError(
            f"exactly one contrastive method per call is supported, got {len(contrastive)}: "
            f"{', '.join(m.name for _, m in contrastive)}. Run them in separate calls."
        )
    index, method = contrastive[0]
    if not isinstance(method, ContrastiveMethod):
        raise TypeError(f"{type(method).__name__} sets contrastive = True but does not subclass ContrastiveMethod.")
    for key, reason in UNSUPPORTED.items():
        if generate_kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be used with {method.name}: {reason}.")
    if generate_kwargs.get("use_cache") is False:
        raise ValueError(f"use_cache=False cannot be used with {method.name}: each stream decodes from its own "
                         "cache rows. Leave use_cache at its default (True).")
    ids = generate_kwargs.get("input_ids", generate_kwargs.get("inputs"))
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"{method.name} needs input_ids of shape [batch, seq] (the processor's output), got "
                         f"{type(ids).__name__}.")
    growth = method.negative_growth(session, ids, generate_kwargs.get("attention_mask"))
    if growth > 0:  # widen the prompts first, so what the methods plan on them stays aligned in the stacked batch
        generate_kwargs, ids = _left_padded_call(session, generate_kwargs, growth)
    engine = _Engine(session, index, method, ids, added_columns=growth)
    with engine.installed():
        out = session.model.generate(**generate_kwargs, cache=engine.cache)
    if engine.trace is not None:
        engine.trace.resolve((out if isinstance(out, Tensor) else out.sequences)[:, -1])
        session.records[index] = {**session.records.get(index, {}), "contrast": engine.trace.report()}
    return out if growth == 0 else _without_leading_columns(out, growth)


def _left_padded_call(session: Session, generate_kwargs: dict[str, Any], width: int) -> tuple[dict[str, Any], Tensor]:
    """The generate arguments with `width` more padding columns on the left of every prompt (ids, mask, token
    types), and the new ids: the positive stream decodes exactly as before, only its prompt coordinates grow."""
    adapter = session.adapter
    pad = pad_token_id(session.tokenizer, session.model, adapter.text_config, avoid=adapter.image_token_id)
    out = dict(generate_kwargs)
    key = "input_ids" if out.get("input_ids") is not None else "inputs"
    ids = out[key]  # [B0, S]
    mask = out.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out[key] = left_pad(ids, ids.shape[1] + width, pad)
    out["attention_mask"] = left_pad(mask, mask.shape[1] + width, 0)
    for types in TOKEN_TYPE_KEYS:
        if isinstance(out.get(types), Tensor):
            out[types] = left_pad(out[types], out[types].shape[1] + width, 0)
    return out, out[key]


def _without_leading_columns(out: Any, width: int) -> Any:
    """generate's result with the first `width` columns of its sequences (the engine's extra padding) removed."""
    if isinstance(out, Tensor):
        return out[:, width:]
    out.sequences = out.sequences[:, width:]
    return out


class _Engine:
    """One call's stream bookkeeping: the paired cache, the stacked mask and positions."""

    def __init__(self, session: Session, index: int, method: ContrastiveMethod, caller_ids: Tensor,
                 added_columns: int = 0) -> None:
        self.session = session
        self.index = index
        self.method = method
        self.caller_ids = caller_ids  # [B0, S] before expansion, the engine's own padding columns included
        self.added_columns = added_columns  # padding columns the engine put left of the caller's prompts
        self.cache = StreamPairCache(config=session.model.config.get_text_config(decoder=True))
        self.batch = 0
        self.expand = 1
        self.paired = True
        self.state: Any = None
        self.mask: Tensor | None = None  # [2B, kv_len] or None when no row has padding
        self.stepping = False  # inside one of the engine's own [positive; negative] forwards
        self.last_positions: Tensor | None = None  # [2B, 1] or [sections, 2B, 1]
        self.step = 0  # tokens generated before the forward running now (0 at the prefill)
        self.trace = ContrastTrace() if session.record else None

    @contextmanager
    def installed(self) -> Iterator[None]:
        model = self.session.model
        rows_before = self.session.edited_rows
        handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        self.session.engine = self
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.session.engine = None
            self.session.edited_rows = rows_before

    # -------------------------------------------------------------------------------- forward hooks
    def _ours(self, kwargs: dict[str, Any]) -> bool:
        """A forward of this engine's own decoding (not a method's extra pass, not another thread's)."""
        return kwargs.get("cache", kwargs.get("past_key_values")) is self.cache and self.session.owns_thread()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not self._ours(kwargs):
            return None  # a method's extra analysis pass, not a decoding step
        self.stepping = True
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if self.cache.get_seq_length() == 0:
            return args, self._prefill(kwargs)
        return (args, self._decode(kwargs)) if self.paired else None

    def _prefill(self, positive: dict[str, Any]) -> dict[str, Any]:
        session = self.session
        self.batch = positive["input_ids"].shape[0]
        self.step = 0
        if self.batch % self.caller_ids.shape[0]:
            raise ValueError(f"generate expanded {self.caller_ids.shape[0]} prompts to {self.batch} rows; "
                             "expected a multiple.")
        self.expand = self.batch // self.caller_ids.shape[0]
        self.state = session.states[self.index]
        replacement = self.method.positive_inputs(session, self.state)
        if replacement:
            positive = {**positive, **self._encoded(replacement)}
            positive = {k: v for k, v in positive.items() if k not in IMAGE_KEYS}
        self.paired = self.method.two_streams(self.state)
        if not self.paired:
            return positive
        if not self.method.edit_negative:
            session.edited_rows = self.batch
        negative = self._encoded(self.method.negative_inputs(session, self.state))
        if not bool(session.adapter.image_mask(negative["input_ids"]).any()):
            negative.pop(FEATURES, None)  # an image-free stream
        pad = pad_token_id(session.tokenizer, session.model, session.adapter.text_config,
                           avoid=session.adapter.image_token_id)
        stacked = stack_row_blocks(positive, negative, pad_token_id=pad)
        mask = stacked.get("attention_mask")
        self.mask = None if mask is None or bool(mask.all()) else mask
        if self.mask is not None and session.adapter.left_padding_changes_rows:
            self._refuse_padded_streams(self.mask)
        if self.mask is None:
            stacked.pop("attention_mask", None)
        positions = stacked.get("position_ids")  # None: the model derives every row's positions itself
        self.last_positions = None if positions is None else positions[..., -1:]
        return stacked

    def _refuse_padded_streams(self, mask: Tensor) -> None:
        """Raise before the stacked prefill when stacking the streams left-padded rows (mask: [2B, seq], 1 on real
        tokens) of a model that gives a padded row other logits than the row alone: the caller's rows were
        unpadded (the session checked them), so the padding is the second prompt's other length."""
        session = self.session
        padded = (mask == 0).any(dim=1).nonzero().flatten().tolist()
        raise PaddedBatchError.of(
            session.adapter.family, type(session.model).__name__, session.adapter.left_padding_cause,
            f"{self.method.name}'s second stream has another length than the prompt (e.g. the prompt without its "
            f"image tokens), so stacking the two streams left-pads rows {padded}",
            "With this model, use a method whose second prompt has the first's length (VCD, DCD), or one without a "
            "second stream (e.g. PAI with cfg=False).",
            by_engine=True,
        )

    def _encoded(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with caller-layout pixel tensors replaced by their encoded features for the B rows."""
        if inputs.get("pixel_values") is None:
            return dict(inputs)
        pixels = {k: inputs[k] for k in IMAGE_KEYS if inputs.get(k) is not None}
        out = {k: v for k, v in inputs.items() if k not in IMAGE_KEYS}
        out[FEATURES] = encode_images(self.session, pixels)
        return out

    def _decode(self, positive: dict[str, Any]) -> dict[str, Any]:
        out = dict(positive)
        ids = positive["input_ids"]  # [B, q]: the tokens chosen for both streams
        if self.trace is not None:
            self.trace.resolve(ids[:, 0])
        out["input_ids"] = torch.cat([ids, ids])
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], ids.shape[1])], dim=-1)
            out["attention_mask"] = self.mask
        else:
            out.pop("attention_mask", None)
        if self.last_positions is not None:  # else the model derives positions, as at the prefill
            steps = torch.arange(1, ids.shape[1] + 1, device=self.last_positions.device)
            positions = self.last_positions + steps
            self.last_positions = positions[..., -1:]
            out["position_ids"] = positions
        for key in TOKEN_TYPE_KEYS:
            if out.get(key) is not None:
                out[key] = torch.cat([out[key], out[key]])
        return out

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._ours(kwargs):
            return None
        self.stepping = False
        if not self.paired:
            return None
        positive, negative = split_streams(output.logits[:, -1], self.batch)
        scores = self.method.combine(self.state, positive.float(), negative.float(), self.step)  # [B, vocab]
        if self.trace is not None:
            self.trace.step(positive, negative)
        self.step += 1
        self.session.applied[self.index].contrast_steps += 1
        if scores.shape != positive.shape:
            raise ValueError(f"{type(self.method).__name__}.combine must return [B, vocab] = "
                             f"{tuple(positive.shape)} scores, got {tuple(scores.shape)}.")
        output.logits = scores[:, None, :]
        for name in ("hidden_states", "attentions"):
            value = getattr(output, name, None)
            if isinstance(value, tuple):
                setattr(output, name, tuple(t[: self.batch] if isinstance(t, Tensor) else t for t in value))
        return output

