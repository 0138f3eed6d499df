"""Triton kernels and their plain-PyTorch references (triton is optional: the `kernels` extra).

The methods' edits at a decode step are closed forms over the grouped op's per-group sums; they live with
the edit vocabulary in `vlmfix.decoding.grouped` (one path, used by the library, its tests and
`benchmarks/kernels.py`).
"""

from vlmfix.kernels.grouped_decode import (
    GroupedDecodeResult,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    grouped_decode_attention_triton,
    grouped_decode_backend,
)

__all__ = [
    "GroupedDecodeResult",
    "grouped_decode_attention",
    "grouped_decode_attention_reference",
    "grouped_decode_attention_triton",
    "grouped_decode_backend",
]
