"""Step 3.7 (`Step3p7ForConditionalGeneration`): the common layout, with a language model whose sliding-window
layers have another head count than its global ones.

```
Step3p7ForConditionalGeneration
├── model: Step3p7Model
│   ├── vision_model ── layers[i], downsampler1/2   (vision_layers; conv downsampling, 4x per side)
│   ├── multi_modal_projector                       (projector: one linear layer)
│   └── language_model: Step3p7TextModel ── layers[l]           (decoder_layers)
│           └── self_attn ── q/k/v_proj, q/k_norm, g_proj, o_proj
│                 heads: num_attention_heads (full_attention layers) or num_sliding_attention_heads
│                 out[..., h, :] *= sigmoid(g_proj(x))[..., h]  (per-head gate, after attention, before o_proj)
└── lm_head
```
Prompt (ChatML): `<|im_start|>user\\n[<patch_start><im_patch>×n<patch_end>...]<im_start><im_patch>×N<im_end>
{instruction}<|im_end|>\\n<|im_start|>assistant\\n`.

The text config is per-layer (transformers' heterogeneous config): `num_attention_heads` has no single value, so
`num_heads` reads the global layers' attention modules (`PerLayerHeadsAdapter`). Edits act inside the attention
call, on each layer's own head count; a head-output scale (VHR) lands before the gate, which scales the same head
by another factor, so the two commute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.per_layer_heads import PerLayerHeadsAdapter
from vlmfix.adapters.qwen2_vl import ChatMLAdapter


@dataclass(frozen=True)
class Step3p7Adapter(PerLayerHeadsAdapter, ChatMLAdapter):
    family: ClassVar[str] = "step3p7"
    model_classes: ClassVar[tuple[str, ...]] = ("Step3p7ForConditionalGeneration",)
    frame_tokens: ClassVar[tuple[str, ...]] = ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>",
                                               "<patch_newline>")
    main_layer_type: ClassVar[str] = "full_attention"  # num_heads: the global layers' count
