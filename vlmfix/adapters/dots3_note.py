"""Dots3 Note (`Dots3NoteForConditionalGeneration`): the common layout, with a DeepSeek-V3.2-style language model
whose sliding-window layers have another head count and other latent ranks than its indexed ones.

```
Dots3NoteForConditionalGeneration
├── model: Dots3NoteModel
│   ├── vision_tower: Dots3NoteVisionModel ── blocks[i], merger   (vision_layers; merger: the projector)
│   ├── audio_tower: Dots3NoteAudioModel                          (audio: not read by vlmfix)
│   └── language_model: Dots3NoteTextModel ── layers[l]           (decoder_layers)
│           └── self_attn: MLA (q_a/q_b, kv_a/kv_b, o_proj), g_proj, indexer (indexed layers only)
│                 heads, ranks: per_layer_config[l] (sliding layers: 64 heads, indexed: 128 on the checkpoint)
│                 indexed layers: each query's top index_topk keys (`indices`, merged into the mask by vlmfix)
│                 out[..., h, :] *= sigmoid(g_proj(x))[..., h]  (per-head gate, after attention, before o_proj)
└── lm_head
```
Prompt (dots.ocr's layout, this family's earlier model): `<|user|><|img|><|imgpad|>×N<|endofimg|>{instruction}
<|endofuser|><|assistant|>`. The instruction ends at <|endofuser|>, or at <|im_end|> should the checkpoint's template
turn out to be ChatML (its tokenizer holds that token too). Verified: the hub id `dots-studio/dots3-note-prev` (the
official README, github.com/studio-dots-ai/dots3-note-prev, and transformers' model page) and, from a read-only check
of the checkpoint by a third party (tokenspeed's Dots3 Note tests), that an assistant turn ends with
<|endofassistant|>, dots.ocr's token. Not verified: the checkpoint's chat template itself (not public where searched),
so the user turn's tokens and any `enable_thinking` text (its README names the switch) are dots.ocr's, not checked.

Edits act inside the attention call, on the query and key tensors of each layer's own head count; a head-output
scale (VHR) lands before the gate, which scales the same head of the same token by another factor, so the two
commute, and the gate's input is the layer's input, which no edit touches. VHR scores a head on its attention
output, before the gate (as on Step 3.7): the head's gated contribution to the residual stream is not what it
measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.per_layer_heads import PerLayerHeadsAdapter

# dots.ocr's end of the user turn; ChatML's, should the checkpoint's (unverified) template be ChatML
MARKERS = ("<|endofuser|>", "<|im_end|>")


@dataclass(frozen=True)
class Dots3NoteAdapter(PerLayerHeadsAdapter):
    family: ClassVar[str] = "dots3_note"
    model_classes: ClassVar[tuple[str, ...]] = ("Dots3NoteForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = MARKERS
    frame_tokens: ClassVar[tuple[str, ...]] = ("<|img|>", "<|endofimg|>")
    main_layer_type: ClassVar[str] = "indexed_attention"  # num_heads: the indexed layers' count
