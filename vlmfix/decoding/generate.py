"""`vlmfix.generate`: `model.generate` with methods applied, returning exactly what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vlmfix.decoding.method import Method
from vlmfix.decoding.session import Session, SpanOverride


def generate(
    model: nn.Module,
    *,
    methods: Sequence[Method | str] = (),
    tokenizer: Any | None = None,
    spans: SpanOverride = None,
    kernel: str = "auto",
    **generate_kwargs: Any,
) -> Any:
    """Run `model.generate(**generate_kwargs)` with `methods` applied (a list of methods or names).

    Every `generate` keyword keeps working (greedy, sampling, beams, `return_dict_in_generate`,
    streamers, left-padded batches). With no method the output is bit-identical to `model.generate`.
    Two-stream methods (VCD, DCD, PAI's refinement) decode both streams in one batched forward per step.
    For the methods' reports, use `with vlmfix.apply(model, *methods) as session: session.generate(...)`
    and `session.report()`.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.VAR(sink_dims=[31, 88], tau=2.0)],
        ...                       max_new_tokens=32)
    """
    with Session(model, methods, tokenizer=tokenizer, spans=spans, kernel=kernel) as session:
        return session.generate(**generate_kwargs)
