"""The toy VLM: a stock `LlavaForConditionalGeneration` (small CLIP vision tower + small Llama decoder).

```
LlavaForConditionalGeneration
├── model: LlavaModel
│   ├── vision_tower: CLIPVisionModel         image 112 px, patch 16 -> 7x7 patches + CLS
│   ├── multi_modal_projector: LlavaMultiModalProjector   (vision hidden -> text hidden, GELU MLP)
│   └── language_model: LlamaModel            decoder layers x N, heads x H
└── lm_head: Linear(text hidden -> vocab)
```

With `vision_feature_select_strategy="default"` the CLS token is dropped, so each image fills 49
`<image>` tokens. The processor is a `LlavaProcessor` over the PIL CLIP image processor (no
torchvision needed) and the word-level tokenizer of `vlmfix.toy.tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .tokenizer import CHAT_TEMPLATE, IMAGE

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the toy VLM. The decoder needs >= 6 layers and >= 4 heads for the attention methods."""

    image_size: int = 112
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_intermediate: int = 256

    def __post_init__(self) -> None:
        if self.text_layers < 6:
            raise ValueError(f"text_layers must be >= 6, got {self.text_layers}; VAR edits layers 2..L-2.")
        if self.text_heads < 4:
            raise ValueError(f"text_heads must be >= 4, got {self.text_heads}; head-level methods need them.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )

    @property
    def image_tokens(self) -> int:
        """Image tokens per image: one per patch (the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: ModelSpec) -> LlavaProcessor:
    """A `LlavaProcessor` that resizes images to `spec.image_size` and expands `<image>` per patch."""
    image_processor = CLIPImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=False,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, spec: ModelSpec) -> LlavaForConditionalGeneration:
    """A randomly initialised toy LLaVA whose vocabulary matches `tokenizer` (seed torch before)."""
    vision = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids(IMAGE)),  # one token: one id
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
