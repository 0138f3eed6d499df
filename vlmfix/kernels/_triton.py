"""Optional triton import (the `kernels` extra), and whether its kernels are compiled or interpreted.

Without triton, `triton.jit` is an identity decorator and `tl.constexpr` a plain annotation, so kernel
modules still import and their public ops fall back to the PyTorch references.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # the `kernels` extra is not installed
    HAS_TRITON = False

    class _TritonPlaceholder:
        """Stands in for `triton` so that `@triton.jit` definitions import without it."""

        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda inner: inner)

    class _TritonLanguagePlaceholder:
        """Stands in for `triton.language` in kernel signatures (`tl.constexpr` annotations)."""

        constexpr = Any

    triton = _TritonPlaceholder()  # type: ignore[assignment]
    tl = _TritonLanguagePlaceholder()  # type: ignore[assignment]
    InterpretedFunction = None  # type: ignore[assignment,misc]


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was built for triton's CPU interpreter (`TRITON_INTERPRET=1`) rather than a GPU."""
    return HAS_TRITON and isinstance(kernel, InterpretedFunction)


def matches_triton_mode(kernel: Any) -> bool:
    """True when `kernel` and triton's own library functions were built in the same mode.

    triton chooses between compiling and interpreting when each `@triton.jit` runs, from `TRITON_INTERPRET`
    at that moment. Its library (`tl.sum`, `tl.max`, ...) is decorated when triton is imported, a kernel
    module when it is imported. If the variable changed in between (set by a test module after something
    else imported triton), the kernel can run neither way. Set it before anything imports triton.
    """
    return HAS_TRITON and is_interpreted(kernel) == isinstance(tl.sum, InterpretedFunction)
