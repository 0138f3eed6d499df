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
The model caches `rope_deltas` between forwards: extra passes restore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlmfix.adapters.base import Adapter


@dataclass(frozen=True)
class Qwen2VLAdapter(Adapter):
    family: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("<|im_end|>",)
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_grid_thw", "mm_encoder_outputs")
    stateful_attributes: ClassVar[tuple[str, ...]] = ("rope_deltas",)

    @property
    def projector(self) -> nn.Module:
        return self._hf.model.visual.merger

    @property
    def vision_tower(self) -> nn.Module:
        return self._hf.model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self._hf.model.visual.blocks

    def image_frame_mask(self, input_ids: Tensor) -> Tensor:
        config = self._hf.config
        return (input_ids == config.vision_start_token_id) | (input_ids == config.vision_end_token_id)

    def text_positions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Text-only M-RoPE positions: the three rotary sections share the 1-D text position."""
        inputs = super().text_positions(inputs)
        inputs["position_ids"] = inputs["position_ids"][None].expand(3, -1, -1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.zeros_like(inputs["input_ids"], dtype=inputs["mm_token_type_ids"].dtype)
        return inputs
