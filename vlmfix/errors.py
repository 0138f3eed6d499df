"""The errors vlmfix raises. Each message names the problem and the fix."""

from __future__ import annotations


class VlmfixError(Exception):
    """Base class of vlmfix's own errors."""


class UnsupportedModelError(VlmfixError, ValueError):
    """The model class has no adapter."""


class PaddedBatchError(UnsupportedModelError):
    """A left-padded prefill on a model that gives a padded row other logits than the row alone (MiniMax M3):
    vlmfix runs it on unpadded batches only. `by_engine` is True when the padding is only what a two-stream
    method's engine added (its second prompt is longer), False when the caller's own rows are padded."""

    def __init__(self, message: str, *, by_engine: bool) -> None:
        super().__init__(message)
        self.by_engine = by_engine

    @classmethod
    def of(cls, family: str, model_class: str, cause: str | None, what: str, fix: str, *,
           by_engine: bool) -> PaddedBatchError:
        """The error for `family` (transformers' `model_class`, padded for `cause`): `what` was padded, `fix`."""
        return cls(f"vlmfix runs {family} on unpadded batches only, and {what}: transformers 5.25's own "
                   f"{model_class} gives a left-padded row other logits than the row alone ({cause}), so no row "
                   f"would get what it gets alone. {fix}", by_engine=by_engine)


class MissingImageError(VlmfixError, ValueError):
    """A method that needs an image got a batch row without one."""


class SpanError(VlmfixError, ValueError):
    """Caller-given token spans do not fit the prompt."""


class SessionError(VlmfixError, RuntimeError):
    """A session was used wrongly (for example `apply` re-entered on the same model)."""


class CheckpointError(VlmfixError, ValueError):
    """A checkpoint is corrupt or does not fit the model."""


class UnknownNameError(VlmfixError, KeyError):
    """A name (method, adapter, parser, ...) is not registered."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""
