"""Last-row edits whose parameters depend on the current forward's own attention (DualStream's head
modulation, GIFT's per-head ratio), which the edit vocabulary cannot plan before the forward.

The method plans nothing for such a layer; instead, while the session's edits are on (the method's
`edits()` is called and arms the rewrite), an observer recomputes the newest query row of that layer:
it builds the method's edit from the row's unedited probabilities, then runs the core's
`edited_attention` on that row with the other methods' edits of the layer plus this one (so the usual
composition order holds), and swaps the row into the layer's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import Edit, additive_mask, edited_attention, key_probabilities, repeat_kv

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

# make_edit(layer_idx, probabilities) -> the method's edit for this row; probabilities: [batch, heads, 1,
# kv_len] fp32, the unedited softmax of the newest query row.
MakeEdit = Callable[[int, Tensor], Edit]


@dataclass
class LastRowRewrite:
    """Per-prompt switch between the method's `edits()` (arms a layer) and the observer (consumes it)."""

    layers: frozenset[int]
    armed: int | None = field(default=None)

    def arm(self, layer_idx: int) -> None:
        if layer_idx in self.layers:
            self.armed = layer_idx


def last_row_probabilities(call: AttentionCall, rows: int) -> Tensor:
    """[rows, heads, 1, kv_len] fp32: the unedited softmax of the newest query row of `call` (each head's
    attention sink, where the layer has one, in the denominator)."""
    query = call.query[:rows, :, -1:]  # [rows, heads, 1, head_dim]
    key = repeat_kv(call.key[:rows], query.shape[1])  # [rows, heads, kv_len, head_dim]
    scaling = query.shape[-1] ** -0.5 if call.scaling is None else call.scaling
    z = (query.float() @ key.float().transpose(-1, -2)) * scaling
    mask = _last_row_mask(call.attention_mask, rows)
    z = z + additive_mask(mask, rows, 1, key.shape[2], z.device)
    return key_probabilities(z, call.sinks)


def _last_row_mask(attention_mask: Tensor | None, rows: int) -> Tensor | None:
    if attention_mask is None:
        return None  # causal: the newest row sees every key
    if attention_mask.dim() == 4:
        return attention_mask[:rows, :, -1:, :]
    return attention_mask[:rows]  # 2-D padding mask (flash backends)


def install_last_row_rewrite(session: Session, rewrite: LastRowRewrite, make_edit: MakeEdit) -> None:
    """Observe the language model's attention for the current prompt and rewrite armed layers' last row."""

    def observer(call: AttentionCall) -> Tensor | None:
        if rewrite.armed != call.layer_idx:
            return None
        rows = session.rows_of_prompt(call.query).shape[0]
        edit = make_edit(call.layer_idx, last_row_probabilities(call, rows))
        # the other methods' edits of this layer's rewritten rows (this one plans none; a negative-stream
        # edit never touches them), not counted again as applied
        others = [e for e in session.edits_for(call.layer_idx, record=False) if e.stream != "negative"]
        rewrite.armed = None
        last = edited_attention(
            call.query[:rows, :, -1:],
            call.key[:rows],
            call.value[:rows],
            _last_row_mask(call.attention_mask, rows),
            call.scaling,
            [*others, edit],
            sinks=call.sinks,
        )  # [rows, 1, heads, head_dim]
        out = call.output.clone()
        out[:rows, -1:] = last.to(out.dtype)
        return out

    session.observe_for_prompt(observer)
