"""One `generate` call's worth of state, and the context manager that installs and undoes it.

```python
with vlmfix.apply(model, vlmfix.VAR()) as session:
    out = model.generate(**inputs, max_new_tokens=32)
print(session.report())
```

Entering a session: registers vlmfix's attention function and its mask builder under a fresh name,
points the language model's `config._attn_implementation` at it, and adds a forward pre-hook on the
model that notices each new prompt (a forward with an empty cache) and runs, for that prompt: spans
(the adapter's, or the caller's), then every method's `prepare`. Leaving it undoes exactly these
changes, in reverse order, also after an exception.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlmfix.adapters import Adapter, Spans, get_adapter
from vlmfix.decoding.attention import Observer, make_attention_function, register, unregister
from vlmfix.decoding.edits import Edit
from vlmfix.decoding.grouped import KeyGroupCache
from vlmfix.decoding.method import METHODS, Method
from vlmfix.errors import MissingImageError, SessionError, SpanError

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()
_NAMES = itertools.count()
_UNPREPARED = object()
KERNEL_MODES = ("auto", "always", "never")
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
# decoding-loop arguments of a prefill forward that an extra analysis pass must not reuse
_LOOP_KEYS = ("cache", "past_key_values", "use_cache", "return_dict")

SpanOverride = Spans | dict[str, Sequence[Sequence[int]]] | None


def resolve_methods(methods: Sequence[Method | str]) -> tuple[Method, ...]:
    """Method instances from instances or registry names (names get default parameters)."""
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
    ) -> None:
        if kernel not in KERNEL_MODES:
            raise ValueError(f"kernel must be one of {', '.join(KERNEL_MODES)}, got {kernel!r}; 'auto' uses the "
                             "Triton decode kernel on CUDA when triton is installed.")
        self.kernel = kernel
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.methods = resolve_methods(methods)
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
        self._span_override = spans
        self.spans: Spans | None = None
        self.inputs: dict[str, Any] = {}
        # the call's image tensors in the caller's layout (pixel_values, image_sizes, image_grid_thw):
        # generate encodes images before its first forward, so the prefill's inputs lack them.
        # vlmfix.generate fills this; around a bare model.generate, set it for methods that re-read pixels.
        self.image_inputs: dict[str, Any] = {}
        self.states: list[Any] = [_UNPREPARED] * len(self.methods)
        self.observers: list[Observer] = []
        # contrastive decoding stacks [positive; negative] rows: edits then apply to the first
        # `edited_rows` rows only (None: every row)
        self.edited_rows: int | None = None
        # the grouped kernel's key groups per edit list, kept for the prompt batch's decode steps
        self.key_groups = KeyGroupCache()
        self.prompts_seen = 0
        self._undo: list[Callable[[], None]] = []
        self._prompt_handles: list[RemovableHandle] = []
        self._in_extra_pass = False
        self._edits_enabled = True
        self._check_methods()

    def _check_methods(self) -> None:
        missing = [m.name for m in self.methods if m.needs_tokenizer and self.tokenizer is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} need the tokenizer to read the instruction's words: pass "
                f"tokenizer=processor (or the tokenizer) to vlmfix.apply / vlmfix.generate."
            )

    # ------------------------------------------------------------------ entering and leaving
    def __enter__(self) -> Session:
        if self.model in _ACTIVE:
            raise SessionError(
                "This model is already inside a vlmfix session; vlmfix.apply cannot be nested on the same "
                "model. Pass all methods to one vlmfix.apply(model, *methods) call instead."
            )
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()
        self.key_groups.clear()  # it holds the edits' tensors

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
        self._clear_prompt_hooks()
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ per prompt
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_extra_pass:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return  # a decode step of the current prompt
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        if inputs.get("input_ids") is None:
            if self.methods:
                raise ValueError("vlmfix methods need input_ids (to find image and instruction tokens), "
                                 "not inputs_embeds alone.")
            return
        self.begin_prompt(inputs)

    def begin_prompt(self, inputs: dict[str, Any]) -> None:
        """Find spans and prepare every method for a new prompt batch."""
        self._clear_prompt_hooks()
        self.key_groups.clear()
        self.inputs = inputs
        self.prompts_seen += 1
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        self.spans = self._resolve_spans(input_ids, attention_mask)
        needy = [m.name for m in self.methods if m.needs_image]
        if needy and not bool(self.spans.has_image.all()):
            rows = (~self.spans.has_image).nonzero().flatten().tolist()
            raise MissingImageError(
                f"{', '.join(needy)} need an image in every prompt, but batch rows {rows} have no image tokens. "
                f"Add an image to those prompts, or run them without these methods."
            )
        self.states = [_UNPREPARED] * len(self.methods)
        for i, method in enumerate(self.methods):
            self.states[i] = method.prepare(self)

    def _resolve_spans(self, input_ids: Tensor, attention_mask: Tensor | None) -> Spans:
        override = self._span_override
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if override is None:
            return self.adapter.spans(input_ids, attention_mask, self.tokenizer)
        if isinstance(override, dict):
            unknown = set(override) - {"image", "instruction"}
            if unknown:
                raise SpanError(f"spans accepts the keys 'image' and 'instruction', got {sorted(unknown)}.")
            batch = len(override.get("image", override.get("instruction", [])))
            if batch == 0 or input_ids.shape[0] % batch:
                raise SpanError(f"spans must give one position list per prompt row; got {batch} rows for a "
                                f"batch of {input_ids.shape[0]}.")
            times = input_ids.shape[0] // batch
            found = self.adapter.spans(input_ids, attention_mask, self.tokenizer)
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

    def add_prompt_hook(self, handle: RemovableHandle) -> None:
        """Keep a torch hook alive for the current prompt only (removed at the next prompt or on exit)."""
        self._prompt_handles.append(handle)

    def _clear_prompt_hooks(self) -> None:
        while self._prompt_handles:
            self._prompt_handles.pop().remove()

    # ------------------------------------------------------------------ during forwards
    def edits_for(self, layer_idx: int) -> list[Edit]:
        """The edits of every prepared method for this layer, in method order."""
        if not self._edits_enabled:
            return []
        edits: list[Edit] = []
        for method, state in zip(self.methods, self.states):
            if state is not _UNPREPARED:
                edits.extend(method.edits(state, layer_idx))
        return edits

    def use_kernel(self, query: Tensor) -> bool:
        """Whether edited decode steps go through the grouped Triton kernel."""
        if self.kernel == "never":
            return False
        if self.kernel == "always":
            return True
        from vlmfix.kernels import grouped_decode_backend

        return query.is_cuda and grouped_decode_backend(query.device) == "triton"

    @contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """Call `observer` on every language-model attention call inside the block."""
        self.observers.append(observer)
        try:
            yield
        finally:
            self.observers.remove(observer)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Any], *, with_edits: bool = True) -> Any:
        """An extra forward pass for a method's analysis (not a prompt of its own).

        It leaves the model as it found it (Qwen's cached `rope_deltas` included); edits of the methods
        prepared so far apply unless `with_edits=False`.
        """
        saved = self.adapter.saved_state()
        self._in_extra_pass, enabled = True, self._edits_enabled
        self._edits_enabled = with_edits and enabled
        inputs = {k: v for k, v in inputs.items() if k not in _LOOP_KEYS}
        inputs.setdefault("logits_to_keep", 1)  # analysis passes read attention, not the full vocab logits
        try:
            return self.model(**inputs, use_cache=False)
        finally:
            self._in_extra_pass, self._edits_enabled = False, enabled
            self.adapter.restore_state(saved)

    # ------------------------------------------------------------------ results
    def report(self) -> dict[str, Any]:
        """What each method decided for the last prompt batch, keyed by method name."""
        return {
            method.name: (method.report(state) if state is not _UNPREPARED else {"prepared": False})
            for method, state in zip(self.methods, self.states)
        }


def apply(
    model: nn.Module,
    *methods: Method | str,
    tokenizer: Any | None = None,
    spans: SpanOverride = None,
    kernel: str = "auto",
) -> Session:
    """Apply `methods` to every `model.generate` / `model(...)` call inside the `with` block.

    Args:
        model: a supported Hugging Face VLM (see `vlmfix.adapters.SUPPORTED_CLASSES`).
        methods: method instances (e.g. `vlmfix.VHR()`) or registered names ("vhr").
        tokenizer: the processor or tokenizer; used to end the instruction span at the assistant
            marker and needed by methods that read words (GIFT).
        spans: override the adapter's spans: a `Spans`, or {"image": [[pos, ...], ...],
            "instruction": [[pos, ...], ...]} with one list per prompt row in padded input_ids positions.
        kernel: "auto" (the Triton decode kernel for edited layers on CUDA), "always" (also on CPU,
            through the Triton interpreter or the kernel's PyTorch reference), or "never".
    """
    return Session(model, methods, tokenizer=tokenizer, spans=spans, kernel=kernel)
