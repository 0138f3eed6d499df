"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the Qwen2-VL layout and prompt, with a
windowed vision tower; the same M-RoPE handling.

```
Qwen2_5_VLForConditionalGeneration
├── model: Qwen2_5_VLModel
│   ├── visual ── blocks[i] (vision_layers), merger (projector)
│   └── language_model: Qwen2_5_VLTextModel ── layers[l] (decoder_layers)
└── lm_head
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.qwen2_vl import Qwen2VLAdapter


@dataclass(frozen=True)
class Qwen25VLAdapter(Qwen2VLAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
