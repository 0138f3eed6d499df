"""Tiny offline builds of the families whose stock image processor needs torchvision, or whose vision
tower is a timm model (see `vlmfix.testing.tiny` for the others).

They run only beside torchvision and timm (`pip install torchvision timm`), which the main CI lane does not
have: their tests carry the `torchvision` marker and run in a second lane. timm towers are built from
their config with random weights (`pretrained=False`, nothing downloaded). Each builder returns
(model, processor) for a language-model shape, as in `vlmfix.testing.tiny_families`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS, word_tokenizer
from vlmfix.testing.tiny_families import Builder, Shape, chatml_template, chatml_tokenizer, token_ids

LLAMA3_SPECIALS = ("<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|image|>", "<|video|>", "<unk>", "user", "assistant", "system")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def timm_config(architecture: str, **model_args: Any) -> dict[str, Any]:
    """A `timm_wrapper` vision config: `architecture` with `model_args` overriding its shape; the wrapper
    builds it with `pretrained=False` (random weights, nothing downloaded)."""
    return dict(model_type="timm_wrapper", architecture=architecture, do_pooling=False, model_args=model_args)


def build_perception_lm(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """PerceptionLM: a timm Perception Encoder (EVA layout, 2 blocks of 32 channels, CLS token, 2-D RoPE) on
    32-pixel tiles, an MLP projector with 2x2 average pooling (4 tokens per tile), Llama. Each image is a
    thumbnail plus up to 4 tiles (`thumb+tile`), every tile of the image a run of placeholders."""
    from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration, PerceptionLMProcessor
    from transformers.models.perception_lm.image_processing_perception_lm import PerceptionLMImageProcessor
    from transformers.models.perception_lm.video_processing_perception_lm import PerceptionLMVideoProcessor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(LLAMA3_SPECIALS, WORDS), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", unk_token="<unk>", pad_token="<|end_of_text|>", padding_side="left",
    )
    ids = token_ids(tokenizer, LLAMA3_SPECIALS)
    for name, token in (("image", "<|image|>"), ("video", "<|video|>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    vision = timm_config("vit_pe_core_tiny_patch16_384", embed_dim=32, depth=2, num_heads=4, img_size=32, patch_size=8,
                         ref_feat_shape=(4, 4))
    text = shape.text(len(tokenizer), pad_token_id=ids["<|end_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                      bos_token_id=ids["<|begin_of_text|>"])
    config = PerceptionLMConfig(vision_config=vision, text_config=dict(model_type="llama", **text),
                                vision_use_cls_token=True, projector_pooling_ratio=2,
                                image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"])
    model = PerceptionLMForConditionalGeneration(config)
    image_processor = PerceptionLMImageProcessor(tile_size=32, max_num_tiles=4, vision_input_type="thumb+tile")
    processor = PerceptionLMProcessor(
        video_processor=PerceptionLMVideoProcessor(), image_processor=image_processor, tokenizer=tokenizer,
        patch_size=8, pooling_ratio=2, chat_template=LLAMA3_TEMPLATE,
    )
    return model, processor


def build_fast_vlm(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """FastVLM: a timm FastViT-HD tower (`fastvit_mci3`'s five stages, one block each, 8 to 32 channels,
    reparameterised for inference; 64x downsampling: 4 tokens per 128-pixel image), a two-layer MLP
    projector, Qwen2. Its checkpoints ship LLaVA's processor (`<image>` expanded to one token per 64-pixel
    patch, no CLS)."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = chatml_tokenizer("<image>")
    tokenizer.image_token = "<image>"  # type: ignore[attr-defined]  # what LlavaProcessor reads
    ids = token_ids(tokenizer, ("<image>", "<|endoftext|>", "<|im_end|>"))
    vision = timm_config("fastvit_mci3", inference_mode=True, layers=[1, 1, 1, 1, 1], embed_dims=[8, 16, 16, 32, 32],
                         mlp_ratios=[2, 2, 2, 2, 2])
    vision.update(hidden_size=64, global_pool="avg")  # the final conv doubles the last stage's 32 channels
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = FastVlmConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text),
                           image_token_index=ids["<image>"], image_seq_length=4)
    model = FastVlmForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128}),
        tokenizer=tokenizer, patch_size=64, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=chatml_template("<image>\n"),
    )
    return model, processor


# families whose processor takes one list of images per prompt
NESTED_IMAGES: frozenset[str] = frozenset()

BUILDERS: dict[str, Builder] = {
    "perception_lm": build_perception_lm,
    "fast_vlm": build_fast_vlm,
}
