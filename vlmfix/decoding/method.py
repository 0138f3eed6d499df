"""The protocol every vlmfix method follows, and the method registry.

A method is a small, validated configuration object: it holds no per-call state. Per call (one
`generate`, one prompt batch) the session asks it to `prepare` a state object, then asks that state
for the layer's edits at every forward, and finally for a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vlmfix.decoding.edits import Edit
from vlmfix.registry import Registry

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session


class Method:
    """Base class of decoding-time methods.

    Subclasses set `name`, validate their arguments in `__init__` (with `vlmfix.validation`), may refuse a
    model in `check`, and override `prepare` (analysis
    once per prompt batch, may run extra forward passes through `session.forward`) and
    `edits` (the layer's plan in the edit vocabulary). Contrastive methods set `contrastive = True`
    and implement the logits stage in `vlmfix.decoding.contrastive`; a method with its own decoding loop
    sets `owns_decoding = True` (see `vlmfix.decoding.opera`).
    """

    name: ClassVar[str] = ""
    needs_image: ClassVar[bool] = True
    needs_tokenizer: ClassVar[bool] = False
    contrastive: ClassVar[bool] = False
    # True: the method rewrites the next-token logits of a single-stream forward (DoLa); the session refuses
    # to combine it with a two-stream (contrastive) method when it is made
    single_stream: ClassVar[bool] = False
    # runs its own decoding loop through generate's `custom_generate` (OPERA): `session.generate` routes to it
    owns_decoding: ClassVar[bool] = False
    # assumes each decode forward feeds one new token per row (newest-row edits and rewrites, per-step sink
    # tests): it cannot serve a loop that feeds several candidate tokens per forward (OPERA)
    one_token_decode: ClassVar[bool] = False

    def check(self, adapter: Adapter) -> None:
        """Refuse a model this method cannot serve, when the session is created (before any work)."""

    def prepare(self, session: Session) -> Any:
        """Analyse the prompt batch (`session.spans`, `session.inputs`) once; return the call's state."""
        return None

    def edits(self, state: Any, layer_idx: int) -> Sequence[Edit]:
        """The edits of layer `layer_idx` for the current forward (called at every forward)."""
        return ()

    def report(self, state: Any) -> dict[str, Any]:
        """What the method decided, per batch row, as plain Python data."""
        return {}

    def params(self) -> dict[str, Any]:
        """The method's parameters, for run fingerprints."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


METHODS: Registry[type[Method]] = Registry("method", base=Method)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method class to the registry under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered.")
    return METHODS.register(cls.name)(cls)
