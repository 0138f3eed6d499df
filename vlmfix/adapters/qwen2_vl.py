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
Prompt: `[<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n<|vision_start|><|image_pad|>×N<|vision_end|>
{instruction}<|im_end|>\\n<|im_start|>assistant\\n` (the system message is optional). The token count
per image is `prod(image_grid_thw) / merge_size**2`.
Everything else is found by the common layout (`vlmfix.adapters.base`): vision start/end from the config,
M-RoPE from the text config's `mrope_section`, and the cached `rope_deltas` that extra passes restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.adapters.base import Adapter
from vlmfix.decoding.prompt_inputs import Splice, find_ids
from vlmfix.errors import SpanError

SYSTEM_HEADER, TURN_END = "<|im_start|>system\n", "<|im_end|>"


@dataclass(frozen=True)
class Qwen2VLAdapter(Adapter):
    family: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("<|im_end|>",)

    def system_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Put `text` in the row's system message (`<|im_start|>system\\n{text}<|im_end|>\\n`), replacing the
        message's text (the default "You are a helpful assistant."), or adding the message before the first
        turn when the prompt has none."""
        header = tokenizer.encode(SYSTEM_HEADER, add_special_tokens=False)
        content = tuple(tokenizer.encode(text, add_special_tokens=False))
        found = find_ids(row, [header])
        if found is None:
            footer = tokenizer.encode(TURN_END + "\n", add_special_tokens=False)
            return Splice(0, 0, (*header, *content, *footer))
        start = found[0] + found[1]
        end = find_ids(row, [tokenizer.encode(TURN_END, add_special_tokens=False)], start)
        if end is None:
            raise SpanError(f"the prompt's system message has no closing {TURN_END}; build the prompt with the "
                            f"processor's chat template.")
        return Splice(start, end[0], content)
