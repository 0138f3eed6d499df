"""One `generate` call's worth of state, and the context manager that installs and undoes it.

```python
with vlmfix.apply(model, vlmfix.VAR(), vlmfix.VCD()) as session:
    out = session.generate(**inputs, max_new_tokens=32)   # every method, two-stream ones included
print(session.report())
```

Entering a session: registers vlmfix's attention function and its mask builder under a fresh name,
points the language model's `config._attn_implementation` at it, and adds a forward pre-hook on the
model that notices each new prompt (a forward with an empty cache) and runs, for that prompt: spans
(the adapter's, or the caller's), then every method's `prepare`. Leaving it undoes exactly these
changes, in reverse order, also after an exception.

Threads: a session belongs to the thread that entered it. Forwards of the same model from other
threads (a plain `model.generate` in a server thread, say) go through the wrapped backend untouched:
no edit, observer or method hook of the session runs for them. One session per model at a time: a
second thread entering `apply` on the same model gets a `SessionError`.

Pictures: `session.plot(row)` draws what the methods decided for a batch row (`vlmfix.viz`) from `report()` and
`prompt_record()` (the prompt's image-token positions and the image inputs that place them on patch grids);
`record=True` also keeps the contrast's per-token log-probabilities and PAI's image-attention gain.

The methods' side of the session (what `Method.prepare` may use): `spans`, `inputs` (the prompt's forward
kwargs, with a [batch, seq] padding mask), `adapter`, `tokenizer`, `forward` (an extra analysis pass),
`observing` (observe the attention calls of such a pass), `observe_for_prompt` and `hook_for_prompt`
(observers and module hooks that live until the next prompt), `rows_of_prompt` (the rows of a forward's
tensor that the methods planned for), `in_extra_pass` (whether such an extra pass runs now), and `call_inputs`
(the caller's generate arguments).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlmfix import validation
from vlmfix.adapters import Adapter, Spans, get_adapter
from vlmfix.decoding.attention import AttentionCall, Observer, make_attention_function, register, unregister
from vlmfix.decoding.edits import Edit
from vlmfix.decoding.grouped import KeyGroupCache
from vlmfix.decoding.key_bias import KeyBiasPlans
from vlmfix.decoding.method import METHODS, Method
from vlmfix.decoding.prompt_inputs import IMAGE_KEYS, image_layout, padding_mask, without_loop_keys
from vlmfix.errors import MissingImageError, PaddedBatchError, SessionError, SpanError

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()
_NAMES = itertools.count()
_UNPREPARED = object()
KERNEL_MODES = ("auto", "always", "never")

SpanOverride = Spans | dict[str, Sequence[Sequence[int]]] | None


def resolve_methods(methods: Sequence[Method | str]) -> tuple[Method, ...]:
    """Method instances from a list of instances or registry names (names get default parameters)."""
    if isinstance(methods, (Method, str)) or not isinstance(methods, (list, tuple)):
        raise ValueError(f"`methods` must be a list of vlmfix methods or method names, got "
                         f"{validation.with_type(methods)}; write "
                         f"methods=[{methods!r}].")
    resolved = []
    for method in methods:
        if isinstance(method, str):
            method = METHODS.get(method)()
        if not isinstance(method, Method):
            raise TypeError(
                f"methods must be vlmfix Method instances or registered names, got {type(method).__name__}. "
                f"Available names: {', '.join(METHODS.names())}"
            )
        resolved.append(method)
    return tuple(resolved)


def resolve_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer inside a processor (or the tokenizer itself); None stays None."""
    if tokenizer is None:
        return None
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    if not (callable(getattr(inner, "encode", None)) and callable(getattr(inner, "decode", None))):
        raise ValueError(f"`tokenizer` must be the model's processor or tokenizer (with encode and decode), got "
                         f"{validation.with_type(tokenizer)}; pass tokenizer=processor.")
    return inner


def padded_rows(valid: Tensor) -> list[int]:
    """The rows of a [batch, seq] padding mask (True on real tokens) that hold padding."""
    return (~valid).any(dim=1).nonzero().flatten().tolist()


@dataclass
class Applied:
    """How often a method changed something in the last prompt batch: layer calls whose attention it
    edited, newest-row rewrites by its observers, steps whose scores its contrast decided, and item steps its
    own decoding loop decided."""

    attention_calls: int = 0
    rewrites: int = 0
    contrast_steps: int = 0
    decoding_steps: int = 0  # item steps whose token its own decoding loop chose (OPERA)


class Session:
    """Per-call state: spans, method states, observers, and the changes made to the model."""

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[Method | str] = (),
        *,
        tokenizer: Any | None = None,
        spans: SpanOverride = None,
        kernel: str = "auto",
        record: bool = False,
    ) -> None:
        self.record = validation.boolean(record, "record", "whether the report keeps what the pictures need "
                                         "(vlmfix.viz): the contrast's per-token log-probabilities, PAI's gain")
        self.kernel = validation.choice(kernel, "kernel", KERNEL_MODES,
                                        "'always' runs edited decode steps through the Triton kernel")
        self.model: Any = model  # a transformers model: generate, config and submodules differ per family
        self.adapter: Adapter = get_adapter(model)
        self.methods = resolve_methods(methods)
        self.tokenizer = resolve_tokenizer(tokenizer)
        self._span_override = spans
        self._spans: Spans | None = None  # the current prompt batch's (see `spans`)
        self.inputs: dict[str, Any] = {}
        # the caller's generate arguments (session.generate fills them): the image tensors in the caller's
        # layout live here, since generate encodes the images before its first forward
        self.call_inputs: dict[str, Any] = {}
        self.states: list[Any] = [_UNPREPARED] * len(self.methods)
        self.applied = [Applied() for _ in self.methods]
        # contrastive decoding stacks [positive; negative] rows: edits then apply to the first
        # `edited_rows` rows only (None: every row); the engine of the running two-stream call
        self.edited_rows: int | None = None
        self.engine: Any = None
        # tokens of the running decoding forward's sequence (cache + new tokens); a sliding-window cache's
        # layers hold fewer keys, which the attention function lays out over the whole sequence for edits
        self.sequence_length: int | None = None
        # (left-padded rows, the sequence length they stay right up to) of the running prompt batch, set at its
        # prefill where the model's padding matters past a length (`Adapter.padded_length_limit`: Llama 4), else None
        self._padded_limit: tuple[list[int], int] | None = None
        self.loop: Any = None  # the running decoding loop of a method that owns it (OPERA), else None
        # the grouped kernel's key groups per edit list, kept for the prompt batch's decode steps
        self.key_groups = KeyGroupCache()
        # one-row SDPA plans of key-bias edits (PAI) per edit list, kept for the prompt batch's decode steps
        self.key_bias_plans = KeyBiasPlans()
        self.prompts_seen = 0
        # the last prompt batch's image inputs, as plain lists, for `prompt_record` (the pictures' patch grids)
        self._prompt_images: dict[str, Any] = {}
        # per method index: plain-data records kept when `record` is on (the contrast's per-step log-probs, ...)
        self.records: dict[int, dict[str, Any]] = {}
        self._owner: int | None = None
        self._undo: list[Callable[[], object]] = []  # return values are ignored
        self._prompt_handles: list[RemovableHandle] = []
        self._prompt_observers: list[tuple[Observer, int | None]] = []  # (observer, method index)
        self._pass_observers: list[Observer] = []
        self._preparing: int | None = None  # the method whose prepare runs now
        self._in_extra_pass = False
        self._edits_enabled = True
        self._check_methods()

    def _check_methods(self) -> None:
        for method in self.methods:
            method.check(self.adapter)
        single = [m.name for m in self.methods if m.single_stream]
        paired = [m.name for m in self.methods if m.contrastive]
        if single and paired:
            raise ValueError(
                f"{', '.join(single)} cannot run in one call with the two-stream method {', '.join(paired)}: "
                f"{single[0]} rewrites each row's next-token logits from that row's own layers (and sets the "
                f"implausible tokens to -inf), which the two streams' logit contrast cannot combine. Run them in "
                f"separate calls."
            )
        missing = [m.name for m in self.methods if m.needs_tokenizer and self.tokenizer is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} need the tokenizer to read the instruction's words: pass "
                f"tokenizer=processor (or the tokenizer) to vlmfix.apply / vlmfix.generate."
            )

    @property
    def spans(self) -> Spans:
        """The current prompt batch's spans (set when a prompt begins, before any method's `prepare`)."""
        if self._spans is None:
            raise SessionError("session.spans is set when a prompt begins: run a forward or generate in the "
                               "session first.")
        return self._spans

    @property
    def image_inputs(self) -> dict[str, Any]:
        """The call's image tensors in the caller's layout (pixel_values, image_sizes, image_grid_thw, ...)."""
        return {k: self.call_inputs[k] for k in IMAGE_KEYS if self.call_inputs.get(k) is not None}

    # ------------------------------------------------------------------ entering and leaving
    def __enter__(self) -> Session:
        holder = _ACTIVE.get(self.model)
        if holder is not None:
            other = "another thread" if holder._owner != threading.get_ident() else "this thread"
            raise SessionError(
                f"This model is already inside a vlmfix session (opened by {other}); sessions cannot be nested "
                f"or shared on one model. Pass all methods to one vlmfix.apply(model, *methods) call, and give "
                f"each thread its own model copy to decode with methods concurrently."
            )
        self._owner = threading.get_ident()
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()
        self.key_groups.clear()  # it holds the edits' tensors
        self.key_bias_plans.clear()

    def _install(self) -> None:
        config = self.adapter.text_config
        original = config._attn_implementation or "eager"
        name = f"vlmfix{next(_NAMES)}_{original}"
        register(name, make_attention_function(self, original), original)
        self._undo.append(lambda: unregister(name))
        config._attn_implementation = name
        self._undo.append(lambda: setattr(config, "_attn_implementation", original))
        handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._undo.append(handle.remove)
        _ACTIVE[self.model] = self
        self._undo.append(lambda: _ACTIVE.pop(self.model, None))

    def _uninstall(self) -> None:
        self._clear_prompt_state()
        while self._undo:
            self._undo.pop()()

    def owns_thread(self) -> bool:
        """Whether the calling thread is the one that entered this session."""
        return threading.get_ident() == self._owner

    # ------------------------------------------------------------------ per prompt
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_extra_pass or not self.owns_thread():
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        new = kwargs.get("input_ids", args[0] if args else None)
        new = new if new is not None else kwargs.get("inputs_embeds")
        self.sequence_length = cached + new.shape[1] if new is not None else None
        if cached > 0:
            if self._padded_limit is not None and self.sequence_length is not None:
                self._refuse_padded_rows_past_limit(*self._padded_limit, self.sequence_length)
            return  # a decode step of the current prompt
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        limit, self._padded_limit = self.adapter.padded_length_limit, None
        if new is not None and (self.adapter.left_padding_changes_rows or limit is not None):
            valid = padding_mask(inputs.get("attention_mask"), new[..., 0] if new.dim() == 3 else new)
            if self.adapter.left_padding_changes_rows:
                self._refuse_padded_rows(valid)
            padded = padded_rows(valid)
            if limit is not None and padded:
                self._padded_limit = (padded, limit)
                self._refuse_padded_rows_past_limit(padded, limit, new.shape[1])
        if inputs.get("input_ids") is None:
            if self.methods:
                raise ValueError("vlmfix methods need input_ids (to find image and instruction tokens), "
                                 "not inputs_embeds alone.")
            return
        self.begin_prompt(inputs)

    def _refuse_padded_rows(self, valid: Tensor) -> None:
        """Raise before a prefill whose rows are padded (valid: [batch, seq], True on real tokens) when the model
        itself gives a padded row other logits than the row alone (`Adapter.left_padding_changes_rows`).

        The padding is the two-stream engine's when it lies only in the columns the engine put left of the
        caller's prompts (a method whose second prompt is longer: ICD), whatever mask the caller passed."""
        padded = padded_rows(valid)
        if not padded:
            return
        added = int(getattr(self.engine, "added_columns", 0))  # 0 outside a two-stream call
        by_engine = added > 0 and bool(valid[:, added:].all())
        raise PaddedBatchError.of(
            self.adapter.family, type(self.model).__name__, self.adapter.left_padding_cause,
            f"rows {padded} of this prefill are left-padded"
            + (" by a two-stream method (its second prompt is longer than the first)" if by_engine else ""),
            "With this model, use a method whose second prompt has the first's length (the batch's own rows are "
            "unpadded)." if by_engine else
            "Decode one prompt a call (batch size 1) or batch prompts of one token length.",
            by_engine=by_engine,
        )

    def _refuse_padded_rows_past_limit(self, padded: list[int], limit: int, length: int) -> None:
        """Raise before a forward whose sequence of `length` positions passes `limit`, the length up to which the
        model itself keeps a left-padded row equal to the row alone (`Adapter.padded_length_limit`), when rows
        `padded` are left-padded (by the caller or by a two-stream method's engine)."""
        if not padded or length <= limit:
            return
        raise PaddedBatchError(
            f"rows {padded} of this batch are left-padded and its sequence reaches {length} positions: "
            f"transformers' own {type(self.model).__name__} gives a left-padded row other logits than the row alone "
            f"past {limit} positions (its NoPE layers scale each query by its position counted from the first slot, "
            f"pads included, from floor_scale = {limit + 1} on), so no row would get what it gets alone. Keep prompt "
            f"and new tokens within {limit} positions, or batch prompts of one token length with a method whose "
            "second prompt has the first's length (no method, VCD, DCD, PAI with cfg=False), or decode one prompt a "
            "call.", by_engine=False)

    def begin_prompt(self, inputs: dict[str, Any]) -> None:
        """Find spans and prepare every method for a new prompt batch.

        `inputs` are the prompt's forward kwargs; methods see them with `attention_mask` as the [batch, seq]
        padding mask, whatever layout the forward got (generate passes 4-D masks with a static cache).
        """
        self._clear_prompt_state()
        input_ids = inputs["input_ids"]
        valid = padding_mask(inputs.get("attention_mask"), input_ids)
        self.inputs = {**inputs, "attention_mask": valid.long()}
        self.prompts_seen += 1
        self._spans = self._resolve_spans(input_ids, valid)
        self._prompt_images = self._image_layout_inputs(inputs, input_ids.shape[0])
        self.records = {}
        needy = [m.name for m in self.methods if m.needs_image]
        if needy and not bool(self.spans.has_image.all()):
            rows = (~self.spans.has_image).nonzero().flatten().tolist()
            raise MissingImageError(
                f"{', '.join(needy)} need an image in every prompt, but batch rows {rows} have no image tokens. "
                f"Add an image to those prompts, or run them without these methods."
            )
        self.states = [_UNPREPARED] * len(self.methods)
        self.applied = [Applied() for _ in self.methods]
        for i, method in enumerate(self.methods):
            self._preparing = i
            self.states[i] = method.prepare(self)
        self._preparing = None

    def _image_layout_inputs(self, inputs: dict[str, Any], batch: int) -> dict[str, Any]:
        """The image inputs that place image tokens on patch grids, as lists, and the rows per caller prompt."""
        found = image_layout({**inputs, **{k: v for k, v in self.call_inputs.items() if v is not None}})
        caller = self.call_inputs.get("input_ids")
        callers = caller.shape[0] if isinstance(caller, Tensor) and caller.dim() == 2 else batch
        found["rows_per_prompt"] = batch // callers if callers and batch % callers == 0 else 1
        return found

    def prompt_record(self) -> dict[str, Any]:
        """The last prompt batch's structure as plain data, for pictures: the family, each row's image-token,
        instruction and valid positions, the image inputs that place image tokens on patch grids (`image_sizes`,
        `image_grid_thw`, VideoLLaMA 3's `image_merge_sizes`, Gemma 4's `image_patch_grids`: each image's patch rows
        and cols), and per row the
        ids of the tokens just before and after each run of image tokens (`image_run_tokens`: Idefics3's
        <row_i_col_j> / <global-img> name the tile that follows, Aya Vision's <|END_OF_IMG|> ends an image)."""
        spans = self.spans

        def positions(mask: Tensor) -> list[list[int]]:  # mask: [batch, seq]
            return [row.nonzero().flatten().tolist() for row in mask.cpu()]

        return {
            "family": self.adapter.family,
            "image_positions": positions(spans.image),
            "instruction_positions": positions(spans.instruction),
            "prompt_length": int(spans.image.shape[1]),
            **self._prompt_images,
            "image_run_tokens": _run_tokens(self.inputs["input_ids"], spans.image),
        }

    def _resolve_spans(self, input_ids: Tensor, valid: Tensor) -> Spans:
        override = self._span_override
        if override is None:
            return self.adapter.spans(input_ids, valid, self.tokenizer)
        if isinstance(override, dict):
            unknown = set(override) - {"image", "instruction"}
            if unknown:
                raise SpanError(f"spans accepts the keys 'image' and 'instruction', got {sorted(unknown)}.")
            batch = len(override.get("image", override.get("instruction", [])))
            if batch == 0 or input_ids.shape[0] % batch:
                raise SpanError(f"spans must give one position list per prompt row; got {batch} rows for a "
                                f"batch of {input_ids.shape[0]}.")
            times = input_ids.shape[0] // batch
            found = self.adapter.spans(input_ids, valid, self.tokenizer)
            image = override.get("image") or [found.image[b * times].nonzero().flatten().tolist() for b in range(batch)]
            instruction = override.get("instruction") or [
                found.instruction[b * times].nonzero().flatten().tolist() for b in range(batch)
            ]
            spans = Spans.from_positions(input_ids.shape[1], image, instruction, valid[::times])
            return spans.repeat_rows(times)
        if override.image.shape != input_ids[: override.batch_size].shape or input_ids.shape[0] % override.batch_size:
            raise SpanError(
                f"spans were built for input_ids of shape {tuple(override.image.shape)}, but the prompt batch "
                f"has shape {tuple(input_ids.shape)}."
            )
        return override.repeat_rows(input_ids.shape[0] // override.batch_size)

    def _clear_prompt_state(self) -> None:
        while self._prompt_handles:
            self._prompt_handles.pop().remove()
        self._prompt_observers.clear()
        self.key_groups.clear()
        self.key_bias_plans.clear()

    # ------------------------------------------------------------------ what methods use
    def observe_for_prompt(self, observer: Observer) -> None:
        """Call `observer` on every attention call of the language model until the next prompt.

        Observers see each layer's `AttentionCall` after its (edited) output is computed and may return a
        replacement output; a method calls this from `prepare`, and its replacements count as its rewrites.
        """
        self._prompt_observers.append((observer, self._preparing))

    def hook_for_prompt(self, module: nn.Module, hook: Callable[..., Any], *, after: bool = False) -> None:
        """Register a forward hook (`after=True`: `hook(module, args, output)`) or pre-hook
        (`hook(module, args, kwargs)`) on `module` until the next prompt; it runs for this session's
        thread only."""

        def guarded(*hook_args: Any) -> Any:
            return hook(*hook_args) if self.owns_thread() else None

        handle = (module.register_forward_hook(guarded) if after
                  else module.register_forward_pre_hook(guarded, with_kwargs=True))
        self._prompt_handles.append(handle)

    def negative_start(self) -> int | None:
        """The first negative row (B) of the two-stream forward running now on this session's thread; None
        outside one (no contrastive engine, a one-stream call, a method's extra pass)."""
        engine = self.engine
        if engine is None or not engine.stepping or not engine.paired or not self.owns_thread():
            return None
        return int(engine.batch)

    def rows_of_prompt(self, tensor: Tensor) -> Tensor:
        """The rows of a forward's tensor that belong to the prompt batch the methods planned for: all of
        them, or the first B rows of a two-stream forward whose other rows are not edited."""
        rows = self.edited_rows
        return tensor[:rows] if rows is not None and tensor.shape[0] > rows else tensor

    @contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """Call `observer` on every language-model attention call inside the block (an extra pass's)."""
        self._pass_observers.append(observer)
        try:
            yield
        finally:
            self._pass_observers.remove(observer)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Any], *, with_edits: bool = True) -> Any:
        """An extra forward pass for a method's analysis (not a prompt of its own).

        The decoding loop's keys (cache, use_cache, ...) are dropped; only the last position's logits are
        computed. It leaves the model as it found it (Qwen's cached `rope_deltas` included); edits of the
        methods prepared so far apply unless `with_edits=False`.
        """
        saved, length = self.adapter.saved_state(), self.sequence_length
        self.sequence_length = None  # an extra pass runs without a cache: its keys are its whole sequence
        self._in_extra_pass, enabled = True, self._edits_enabled
        self._edits_enabled = with_edits and enabled
        inputs = without_loop_keys(inputs)
        inputs.setdefault("logits_to_keep", 1)  # analysis passes read attention, not the full vocab logits
        try:
            return self.model(**inputs, use_cache=False)
        finally:
            self._in_extra_pass, self._edits_enabled = False, enabled
            self.sequence_length = length
            self.adapter.restore_state(saved)

    # ------------------------------------------------------------------ what the attention function uses
    def edits_for(self, layer_idx: int, *, record: bool = True) -> list[Edit]:
        """The edits of every prepared method for this layer, in method order (`record`: count them as
        applied when this is a decoding forward)."""
        if not self._edits_enabled:
            return []
        edits: list[Edit] = []
        for method, state, applied in zip(self.methods, self.states, self.applied):
            if state is _UNPREPARED:
                continue
            planned = method.edits(state, layer_idx)
            if planned:
                edits.extend(planned)
                if record and not self._in_extra_pass:
                    applied.attention_calls += 1
        return edits

    def use_kernel(self) -> bool:
        """Whether edited decode steps go through the grouped Triton kernel: with kernel="always" only. "auto"
        keeps SDPA (key biases) and the PyTorch edit path: on an H200 a VAR-edited step through the kernel took
        1.1-1.2 ms at 4k keys against the PyTorch path's 0.7 ms (`python -m benchmarks.kernels`)."""
        return self.kernel == "always"

    @property
    def in_extra_pass(self) -> bool:
        """Whether a method's extra analysis pass (`forward`) is running now; hooks that change decoding
        (not analysis) skip it."""
        return self._in_extra_pass

    @property
    def observed(self) -> bool:
        return bool(self._prompt_observers or self._pass_observers)

    def observe(self, call: AttentionCall) -> Tensor:
        """Run the observers on one attention call; returns the (possibly replaced) output."""
        for observer, owner in [*self._prompt_observers, *((o, None) for o in self._pass_observers)]:
            replaced = observer(call)
            if replaced is not None:
                call.output = replaced
                if owner is not None and not self._in_extra_pass:
                    self.applied[owner].rewrites += 1
        return call.output

    # ------------------------------------------------------------------ generate and report
    def generate(self, **generate_kwargs: Any) -> Any:
        """`model.generate(**generate_kwargs)` with the session's methods; the one way that serves every
        method, two-stream ones (VCD, DCD, PAI's refinement) and OPERA's beam search included. Returns what
        `generate` returns."""
        if not self.owns_thread():
            raise SessionError("session.generate must run on the thread that entered the session.")
        self.call_inputs = dict(generate_kwargs)
        self._refuse_long_padded_call(generate_kwargs)
        try:
            if any(m.owns_decoding for m in self.methods):
                from vlmfix.decoding.opera import generate_opera

                return generate_opera(self, **generate_kwargs)
            if any(m.contrastive for m in self.methods):
                from vlmfix.decoding.contrastive import generate_contrastive

                return generate_contrastive(self, **generate_kwargs)
            return self.model.generate(**generate_kwargs)
        finally:
            self.call_inputs = {}

    def _refuse_long_padded_call(self, generate_kwargs: dict[str, Any]) -> None:
        """`_refuse_padded_rows_past_limit` before any forward, for a call whose own rows are padded and whose
        prompt plus `max_new_tokens` passes the limit (padding a two-stream engine adds is caught at its prefill)."""
        input_ids, new_tokens = generate_kwargs.get("input_ids"), generate_kwargs.get("max_new_tokens")
        limit = self.adapter.padded_length_limit
        if limit is None or not isinstance(input_ids, Tensor) or new_tokens is None:
            return
        padded = padded_rows(padding_mask(generate_kwargs.get("attention_mask"), input_ids))
        self._refuse_padded_rows_past_limit(padded, limit, input_ids.shape[1] + int(new_tokens))

    def plot(self, row: int = 0, images: Any = None, **options: Any) -> Any:
        """The pictures of what each method decided for batch row `row` (a matplotlib figure with `save(path)`);
        see `vlmfix.viz.plot`."""
        from vlmfix.viz import plot

        return plot(self, row=row, images=images, **options)

    def report(self) -> dict[str, Any]:
        """What each method decided for the last prompt batch, keyed by method name; each entry's
        `applied` says how often the method changed something (attention calls, rewrites, contrast steps)."""
        out = {}
        for i, (method, state, applied) in enumerate(zip(self.methods, self.states, self.applied)):
            entry = method.report(state) if state is not _UNPREPARED else {"prepared": False}
            if i in self.records:
                entry = {**entry, "record": self.records[i]}
            out[method.name] = {**entry, "applied": {"attention_calls": applied.attention_calls,
                                                     "rewrites": applied.rewrites,
                                                     "contrast_steps": applied.contrast_steps,
                                                     "decoding_steps": applied.decoding_steps}}
        return out


def apply(
    model: nn.Module,
    *methods: Method | str,
    tokenizer: Any | None = None,
    spans: SpanOverride = None,
    kernel: str = "auto",
    record: bool = False,
) -> Session:
    """Apply `methods` to the generate calls inside the `with` block; returns the `Session`.

    `session.generate(**inputs)` serves every method. A bare `model.generate(...)` inside the block works
    for the single-stream methods (VHR, VAR, GIFT, PAI and DualStream without refinement); two-stream
    methods and OPERA (its own beam search) need `session.generate` and say so.

    Args:
        model: a supported Hugging Face VLM (see `vlmfix.adapters.SUPPORTED_CLASSES`).
        methods: method instances (e.g. `vlmfix.VHR()`) or registered names ("vhr").
        tokenizer: the processor or tokenizer; used to end the instruction span at the assistant
            marker and needed by methods that read words (GIFT).
        spans: override the adapter's spans: a `Spans`, or {"image": [[pos, ...], ...],
            "instruction": [[pos, ...], ...]} with one list per prompt row in padded input_ids positions.
        kernel: "auto" or "never" (SDPA with key biases or the PyTorch edit path; on an H200 the PyTorch path
            ran a VAR-edited step faster than the kernel's), or "always" (edited decode steps through the grouped
            Triton kernel: compiled on CUDA, else the Triton interpreter or the kernel's PyTorch reference).
        record: keep what `vlmfix.viz` draws beyond the reports (each contrastive method's per-token
            log-probabilities under `report()[name]["record"]`, PAI's image-attention gain); costs a little
            time per step. `session.plot(row=0)` draws the pictures.
    """
    flat = methods[0] if len(methods) == 1 and isinstance(methods[0], (list, tuple)) else methods
    if flat is not methods:
        raise ValueError(f"vlmfix.apply takes the methods one by one, got a {type(flat).__name__}; write "
                         f"vlmfix.apply(model, *methods) or vlmfix.apply(model, VAR(), GIFT()).")
    return Session(model, list(methods), tokenizer=tokenizer, spans=spans, kernel=kernel, record=record)


def _run_tokens(input_ids: Tensor, image: Tensor) -> list[list[list[int]]]:
    """Per row, the ids [before, after] of the tokens around each run of consecutive image tokens (-1: none)."""
    out = []
    for ids, mask in zip(input_ids.cpu().tolist(), image.cpu()):  # mask: [seq] bool
        before = torch.cat([mask.new_zeros(1), mask[:-1]])
        after = torch.cat([mask[1:], mask.new_zeros(1)])
        starts = (mask & ~before).nonzero().flatten().tolist()
        ends = (mask & ~after).nonzero().flatten().tolist()
        out.append([[ids[s - 1] if s > 0 else -1, ids[e + 1] if e + 1 < len(ids) else -1]
                    for s, e in zip(starts, ends)])
    return out
