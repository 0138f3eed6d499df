"""Qwen2-VL (`Qwen2VLForConditionalGeneration`).

```
Qwen2VLForConditionalGeneration
├── model: Qwen2VLModel
│   ├── visual: Qwen2VisionTransformerPretrainedModel
│   │     ├── blocks[i]                                   (vision_layers; no CLS token)
│   │     └── merger                                      (projector)
│   └── language_model: Qwen2VLTextModel ── layers[l]     (decoder_layers)
│           ├── input_layernorm
│           └── self_attn ── q/k/v_proj, o_proj           (M-RoPE positions [3, batch, seq])
└── lm_head
```
Prompt: `<|im_start|>user\\n<|vision_start|><|image_pad|>×N<|vision_end|>{instruction}<|im_end|>\\n
<|im_start|>assistant\\n`. The token count per image is `prod(image_grid_thw) / merge_size**2`.
Everything is found by the common layout (`vlmfix.adapters.base`): vision start/end from the config,
M-RoPE from the text config's `mrope_section`, and the cached `rope_deltas` that extra passes restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.base import Adapter


@dataclass(frozen=True)
class Qwen2VLAdapter(Adapter):
    family: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("<|im_end|>",)
