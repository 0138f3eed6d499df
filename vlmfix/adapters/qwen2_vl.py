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
from functools import partial
from typing import Any, ClassVar

from vlmfix.adapters.base import Adapter
from vlmfix.decoding.prompt_inputs import Splice, after_bos, find_ids
from vlmfix.errors import SpanError

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
SYSTEM_HEADER = TURN_START + "system\n"
CHATML: tuple[str, ...] = (TURN_END,)  # <|im_start|>user ... <|im_end|>\n<|im_start|>assistant\n


@dataclass(frozen=True)
class ChatMLAdapter(Adapter):
    """A family whose chat template is ChatML: the user's turn ends with <|im_end|>, and ICD's system placement
    fills the ChatML system message (`chatml_system_splice`) rather than writing its text before the first turn.
    Qwen2-VL, HY V4 VL, Step 3.7 and the common-layout families with ChatML markers build on it."""

    assistant_markers: ClassVar[tuple[str, ...]] = CHATML

    def system_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Put `text` in the row's ChatML system message (`chatml_system_splice`)."""
        return chatml_system_splice(row, text, tokenizer)


@dataclass(frozen=True)
class Qwen2VLAdapter(ChatMLAdapter):
    family: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)


def chatml_system_splice(row: Sequence[int], text: str, tokenizer: Any) -> Splice:
    """Put `text` in one ChatML prompt row's system message (`<|im_start|>system\\n{text}<|im_end|>\\n`): in place
    of the message's text (Qwen2-VL's default "You are a helpful assistant."), into an empty system turn
    (`<|im_start|>system<|im_end|>`, LightOnOCR's), or as a new system message before the first turn (after BOS)
    when the prompt has none. A row without `<|im_start|>` is not a ChatML prompt and raises a SpanError."""
    encode = partial(tokenizer.encode, add_special_tokens=False)
    header, bare_header, turn_end = encode(SYSTEM_HEADER), encode(SYSTEM_HEADER.rstrip("\n")), encode(TURN_END)
    content = tuple(encode(text))
    found = find_ids(row, [header])
    if found is not None:
        start = found[0] + found[1]
        end = find_ids(row, [turn_end], start)
        if end is None:
            raise SpanError(f"the prompt's system message has no closing {TURN_END}; build the prompt with the "
                            f"processor's chat template.")
        return Splice(start, end[0], content)
    empty = find_ids(row, [bare_header + turn_end])
    if empty is not None and header[: len(bare_header)] == bare_header:  # the line break after "system", then text
        start = empty[0] + len(bare_header)
        return Splice(start, start, (*header[len(bare_header):], *content))
    if find_ids(row, [encode(TURN_START)]) is None:
        raise SpanError(f"the prompt row has no {TURN_START} turn, so it is not a ChatML prompt and ICD's system "
                        f"placement has no system message to write; build the prompt with the processor's chat "
                        f"template, or use placement='after_image'.")
    start = after_bos(row, tokenizer)
    return Splice(start, start, (*header, *content, *encode(TURN_END + "\n")))
