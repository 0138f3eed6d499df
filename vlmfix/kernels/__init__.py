"""Triton kernels and their plain-PyTorch references (triton is optional: the `kernels` extra)."""

from vlmfix.kernels.epilogues import gift_output, plain_output, scale_heads, var_output, var_selected_heads
from vlmfix.kernels.grouped_decode import (
    GroupedDecodeResult,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    grouped_decode_attention_triton,
    grouped_decode_backend,
)

__all__ = [
    "GroupedDecodeResult",
    "gift_output",
    "grouped_decode_attention",
    "grouped_decode_attention_reference",
    "grouped_decode_attention_triton",
    "grouped_decode_backend",
    "plain_output",
    "scale_heads",
    "var_output",
    "var_selected_heads",
]
