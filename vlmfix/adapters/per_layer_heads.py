"""Adapters of families whose decoder layers do not share one head count (transformers' per-layer config).

Step 3.7's sliding-window layers have more heads than its global ones; Dots3 Note's have fewer than its indexed
ones. The config's `num_attention_heads` then describes one layer type only (or none), so each layer's count is
read on its attention module, and `num_heads` names the count of the layers of type `main_layer_type`.
Edits act inside the attention call on the query and key tensors it receives, whatever their head count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.adapters.base import Adapter


@dataclass(frozen=True)
class PerLayerHeadsAdapter(Adapter):
    # the layer type whose head count `num_heads` reports (the layers without a sliding window)
    main_layer_type: ClassVar[str]

    def heads_in(self, layer_idx: int) -> int:
        """Query heads of decoder layer `layer_idx` (layer types differ)."""
        attn: Any = self.attn(layer_idx)
        return int(attn.num_heads)

    @property
    def num_heads(self) -> int:
        """Query heads of the `main_layer_type` layers (the first layer where none has that type)."""
        layer_types = list(self.text_config.layer_types)
        first = layer_types.index(self.main_layer_type) if self.main_layer_type in layer_types else 0
        return self.heads_in(first)
