"""HY V4 VL (`HYV4VLForConditionalGeneration`): the common layout, with a hyper-connected DeepSeek-V3.2-style
language model whose attention has learned sinks.

```
HYV4VLForConditionalGeneration
├── model: HYV4VLModel
│   ├── vision_tower: HYV4VLVisionModel ── layers[i], patch_merger  (vision_layers; patch_merger: the projector,
│   │                                      which appends one `image_newline` token per merged row)
│   └── language_model: HYV4VLTextModel ── layers[l]                (decoder_layers)
│           ├── attn_hc, ffn_hc: mix 4 residual streams into one input, add the output back to each stream
│           ├── input_layernorm                                     (its input: attn_hc's mix)
│           ├── self_attn: MLA (q_a/q_b, kv_a/kv_b, o_proj), indexer ("full" layers), sinks [heads], gate_proj
│           │     each query's top index_topk keys (`indices`, merged into the mask by vlmfix; "shared" layers
│           │     reuse the previous full layer's); softmax over [scores, sink] (`s_aux`, honoured by vlmfix);
│           │     out *= sigmoid(gate_proj(x)) per channel, [heads, v_head_dim] (after attention, before o_proj)
│           └── hc_head, norm: collapse the 4 streams into one hidden state (`stream_collapse`), then RMSNorm
└── lm_head
```
Prompt: ChatML with `<|image_pad|>` repeated over the merged grid plus one per row, a stand-in (the checkpoint's
chat template was not checked). Eager is the model's only text attention (no SDPA, flash or flex path).

Hyper-connections, method by method. No decoder module's input or output is one residual stream: each layer
carries [batch, seq, 4, hidden] and mixes it into the one hidden state its attention reads (attn_hc), then adds
the output back to each stream with its own weight. vlmfix's edits (PAI's and SID's key biases, GIFT's and
DualStream's reweights, VAR's transfer, VHR's head scale) act inside the attention call, on the queries, keys
and probabilities made from that one mixed input and on the head outputs before the gate: none reads or writes a
stream, so none depends on how many there are. The sigmoid gate is elementwise, one factor per head and channel
(gate_proj outputs heads x v_head_dim); VHR's head scale is one factor per head, so the two commute. VHR scores a
head on its output before the gate (as on Dots3 Note). VAR finds sink tokens on
`input_layernorm`'s input, here attn_hc's mix: the hidden state the layer's keys are made from (its sink
dimensions must be calibrated on the same tensor; none are published). DoLa's early exit collapses a layer's
streams with the model's own readout (`stream_collapse`, then the head) before reading logits. AvisC zeroes
image embeddings before the model copies them into the streams; the contrastive methods read logits only.
OPERA refuses the family (the indexer's key cache, as on Mistral Large 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.adapters.qwen2_vl import ChatMLAdapter


@dataclass(frozen=True)
class HYV4VLAdapter(ChatMLAdapter):
    family: ClassVar[str] = "hy_v4_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("HYV4VLForConditionalGeneration",)
