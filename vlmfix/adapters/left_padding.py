"""Why a family's own model gives a left-padded row other logits than the row alone
(`Adapter.left_padding_changes_rows`), for the session's refusal of a padded batch.

The cause text sits beside the rule's layer type here rather than in `vlmfix.adapters.base` (edited by another
change at the same time); `Adapter.left_padding_changes_rows` keys on the same layer type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmfix.adapters.base import Adapter

# decoder layer type -> what in transformers 5.24's model file makes a padded row differ from the row alone
CAUSES: dict[str, str] = {
    "minimax_m3_sparse": (
        "its block-sparse indexer masks the key slots past each query's content position and anchors blocks to "
        "slots: modeling_minimax_m3_vl.py:524, :578, :586"
    ),
}


def left_padding_cause(adapter: Adapter) -> str:
    """The reason `adapter`'s model keeps no left-padded row as it is alone, for an error message."""
    layer_types = getattr(adapter.text_config, "layer_types", None) or ()
    found = [cause for kind, cause in CAUSES.items() if kind in layer_types]
    return found[0] if found else "its attention depends on where a row's content starts in the batch"
