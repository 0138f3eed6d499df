"""LLaVA-1.5 (`LlavaForConditionalGeneration`).

```
LlavaForConditionalGeneration
├── model: LlavaModel
│   ├── vision_tower: CLIPVisionModel ── vision_model.encoder.layers[i]      (vision_layers)
│   ├── multi_modal_projector                                             (projector)
│   └── language_model: LlamaModel ── layers[l]                           (decoder_layers)
│           ├── input_layernorm                                           (input_layernorm)
│           └── self_attn ── q_proj, k_proj, v_proj, o_proj                (attn, o_proj)
└── lm_head
```
Prompt: `[<s>][system ]USER: <image>×N\\n{instruction} ASSISTANT:`; the image placeholder is
`config.image_token_id`. The system text (none in llava-hf's template) sits between BOS and `USER:`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.base import Adapter


@dataclass(frozen=True)
class LlavaAdapter(Adapter):
    family: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("ASSISTANT:", "ASSISTANT", "[/INST]", "<|im_end|>")
    user_markers: ClassVar[tuple[str, ...]] = ("USER:", "[INST]")
