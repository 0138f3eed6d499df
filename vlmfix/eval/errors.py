"""Errors of `vlmfix.eval`. Each message names the argument, the value and the fix."""

from __future__ import annotations

from vlmfix.errors import VlmfixError


class EvalInputError(VlmfixError, ValueError):
    """A benchmark input (file, id list, config value) is malformed or does not fit the protocol."""


class MissingGroundTruthError(EvalInputError):
    """A caption's image id has no ground truth (`on_missing_gt='error'`)."""


class NormalizerUnavailableError(VlmfixError, RuntimeError):
    """The chosen CHAIR normalizer needs an optional package or data that is not installed."""
