"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): as LLaVA-1.5, but each image has its own token
count (base view + AnyRes tiles + newline tokens), so spans come from `input_ids` only.

```
LlavaNextForConditionalGeneration
├── model: LlavaNextModel
│   ├── vision_tower: CLIPVisionModel ── vision_model.encoder.layers[i]      (vision_layers)
│   ├── multi_modal_projector                                             (projector)
│   ├── image_newline
│   └── language_model: LlamaModel / MistralModel ── layers[l]            (decoder_layers)
└── lm_head
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.llava import LlavaAdapter


@dataclass(frozen=True)
class LlavaNextAdapter(LlavaAdapter):
    family: ClassVar[str] = "llava_next"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
