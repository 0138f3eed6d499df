"""Errors of `vlmfix.eval`. Each message names the argument, the value and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vlmfix.errors import VlmfixError

T = TypeVar("T")


class EvalInputError(VlmfixError, ValueError):
    """A benchmark input (file, id list, config value) is malformed or does not fit the protocol."""


class MissingGroundTruthError(EvalInputError):
    """A caption's image id has no ground truth (`on_missing_gt='error'`)."""


class NormalizerUnavailableError(VlmfixError, RuntimeError):
    """The chosen CHAIR normalizer needs an optional package or data that is not installed."""


def checked(check: Callable[..., T], value: Any, name: str, **options: Any) -> T:
    """Run a `vlmfix.validation` check; its `ValueError` is raised as an `EvalInputError`, same message.

    >>> from vlmfix import validation
    >>> checked(validation.number, 3, "n", integer=True, low=1)
    3
    """
    try:
        return check(value, name, **options)
    except EvalInputError:
        raise
    except ValueError as err:
        raise EvalInputError(str(err)) from None
