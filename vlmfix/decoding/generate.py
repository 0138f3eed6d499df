"""`vlmfix.generate`: `model.generate` with methods applied, returning exactly what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vlmfix.decoding.method import Method
from vlmfix.decoding.session import IMAGE_KEYS, SpanOverride, apply


def generate(
    model: nn.Module,
    *,
    methods: Sequence[Method | str] = (),
    tokenizer: Any | None = None,
    spans: SpanOverride = None,
    kernel: str = "auto",
    **generate_kwargs: Any,
) -> Any:
    """Run `model.generate(**generate_kwargs)` with `methods` applied.

    Every `generate` keyword keeps working (greedy, sampling, beams, `return_dict_in_generate`,
    streamers, left-padded batches). With no method the output is bit-identical to `model.generate`.
    Contrastive methods (VCD, DCD) decode both streams in one batched forward per step.

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.VAR()], max_new_tokens=32)
    """
    with apply(model, *methods, tokenizer=tokenizer, spans=spans, kernel=kernel) as session:
        session.image_inputs = {k: generate_kwargs[k] for k in IMAGE_KEYS if generate_kwargs.get(k) is not None}
        if any(m.contrastive for m in session.methods):
            from vlmfix.decoding.contrastive import generate_contrastive

            return generate_contrastive(session, **generate_kwargs)
        return model.generate(**generate_kwargs)
