"""Apertus 1.5 (`Apertus1p5ForConditionalGeneration`): images enter as discrete VQ codes, embedded by the text table.

```
Apertus1p5ForConditionalGeneration
├── model: Apertus1p5Model
│   ├── vision_tokenizer: encode-only VQGAN (convolutions, argmax over a codebook; no transformer layers)
│   ├── audio_tokenizer: WavTokenizer encoder (unused by image prompts)
│   └── language_model: Apertus1p5TextModel ── layers[l]            (decoder_layers)
│           ├── attention_layernorm, feedforward_layernorm        (no `input_layernorm`: the layer itself)
│           └── self_attn ── q/k/v_proj, q_norm, k_norm, o_proj
└── lm_head (text rows only in the released checkpoints: `output_vocab_size`)
```
Image features: each image is encoded at its own size to one code per 16x16 pixels; the codes, offset into the
vocabulary (`image_token_offset`), are embedded by `language_model.embed_tokens` and placed at the `<|image|>`
placeholders. There is no projector (DCD refuses it) and no vision transformer (DualStream refuses it). Nothing
outside the prompt changes: the placeholders are ordinary prompt tokens, so the spans and edits are the common ones.
Prompt: `<s><|user_start|><|img_start|>H*W<|img_token_start|>` then H rows of W `<|image|>`, rows separated by
`<|img_end_of_row|>`, `<|img_end|>`, the text, `<|user_end|><|assistant_start|>`. The wrapping tokens are frames;
the `H*W` header is text between them (it stays in a prompt whose image is removed).
Pixels: the processor pads `pixel_values` to the batch's largest image and gives each image's own size in
`image_sizes` (the model crops to it), which `pixel_extents` reports so VCD noises each image alike alone or
batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from vlmfix.adapters.base import Adapter


@dataclass(frozen=True)
class Apertus1p5Adapter(Adapter):
    family: ClassVar[str] = "apertus1p5"
    model_classes: ClassVar[tuple[str, ...]] = ("Apertus1p5ForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("<|user_end|>",)
    frame_tokens: ClassVar[tuple[str, ...]] = ("<|img_start|>", "<|img_token_start|>", "<|img_end_of_row|>",
                                               "<|img_end|>")

    @property
    def projector(self) -> nn.Module:
        raise AttributeError(f"{type(self.model).__name__} has no image projector: its image codes are embedded by "
                             "the language model's own embedding table (`embed_tokens`, shared with the text), not "
                             "by a module that could be trained and swapped for the image alone")

    def pixel_extents(self, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Each image's (height, width) from the processor's `image_sizes` ([images, 2], its resized size)."""
        sizes = inputs.get("image_sizes")
        if not isinstance(sizes, Tensor):
            return None
        return [(int(h), int(w)) for h, w in sizes.tolist()]
