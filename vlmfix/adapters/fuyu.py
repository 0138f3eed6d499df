"""Fuyu (`FuyuForCausalLM`): image patches embedded straight into a Persimmon language model.

```
FuyuForCausalLM
├── model: FuyuModel
│   ├── vision_embed_tokens: Linear(patch² · channels → hidden)   (projector; no vision tower)
│   └── language_model: PersimmonModel ── layers[l]              (decoder_layers)
│           ├── input_layernorm
│           └── self_attn ── query_key_value (fused), dense      (o_proj: `dense`; no GQA)
└── lm_head
```
Prompt, written by the processor itself (no chat template): `|SPEAKER|×w |NEWLINE|` for each of the image's
patch rows, then `<s>`, the instruction and the answer marker `<0x04>`; left-padded. `|SPEAKER|` is the
config's image placeholder; each `|NEWLINE|` (a text token that ends a patch row) is the image's frame: it
is not an image token, not part of the instruction, and goes with the image when the image is removed.
Image features: `get_image_features` returns the patch embeddings in `last_hidden_state` (no
`pooler_output`), one [patches, hidden] run for the batch's images in order (`prompt_inputs.image_field`).
One image per prompt (the processor pairs each text with one image). Pass `return_legacy_image_output=False`
to the processor so the patches come as `pixel_values` (the legacy `image_patches` key is not encoded by
`generate` and cannot be re-encoded by the two-stream methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from vlmfix.adapters.base import Adapter, Spans


@dataclass(frozen=True)
class FuyuAdapter(Adapter):
    family: ClassVar[str] = "fuyu"
    model_classes: ClassVar[tuple[str, ...]] = ("FuyuForCausalLM",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("<0x04>",)  # the processor's beginning-of-answer token

    def o_proj(self, layer_idx: int) -> nn.Linear:
        return cast(nn.Linear, self.attn(layer_idx).dense)

    @property
    def projector(self) -> nn.Module:
        """The patch embedding, the one module between pixels and the language model (what DCD swaps)."""
        return cast(nn.Module, self.base.vision_embed_tokens)

    def patch_grid(self, input_ids: Tensor) -> Tensor:
        """(1, 1, patches) per prompt with an image: the processor gives one image per prompt and one image token
        per patch, in prompt order."""
        counts = self.image_mask(input_ids).sum(dim=1)  # [batch]
        counts = counts[counts > 0]
        ones = torch.ones_like(counts)
        return torch.stack([ones, ones, counts], dim=1)

    def image_frame_mask(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] the `|NEWLINE|` that ends each patch row: the token right after a run of image tokens."""
        image = self.image_mask(input_ids)
        frame = torch.zeros_like(image)
        frame[:, 1:] = image[:, :-1] & ~image[:, 1:]
        return frame

    def spans(self, input_ids: Tensor, attention_mask: Tensor | None = None, tokenizer: Any | None = None) -> Spans:
        """The common spans, without the `<s>` that the processor puts between the image and the instruction."""
        found = super().spans(input_ids, attention_mask, tokenizer)
        bos = getattr(self.text_config, "bos_token_id", None)
        if bos is None:
            return found
        return Spans(image=found.image, instruction=found.instruction & (input_ids != bos), valid=found.valid)
