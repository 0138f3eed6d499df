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
from vlmfix.testing.tiny_families import Builder, Shape, chatml_template, chatml_tokenizer, fan_in_init, token_ids

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
    # transformers draws the timm tower's convolutions at std 0.02; its reparameterised stages have no norm, so
    # they shrank the features ~1e-20x and every image gave the same logits
    fan_in_init(model.model.vision_tower, gain=2**0.5)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128}),
        tokenizer=tokenizer, patch_size=64, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=chatml_template("<image>\n"),
    )
    return model, processor


MOLMO2_TOKENS = ("<|image|>", "<|video|>", "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>",
                 "<frame_start>", "<im_end>", "<frame_end>", "<im_low>")


def build_molmo2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Molmo2: a ViT of 8-pixel patches on 32-pixel crops (16 position embeddings), an attention-pooling adapter
    (2x2 patches per token) reading two ViT layers, a Qwen3-style language model (q/k norm). Each image is a
    low-resolution view and overlapping high-resolution crops, each a grid of `<im_patch>` rows closed by
    `<im_col>`, wrapped in `<low_res_im_start>` / `<im_start>` ... `<im_end>`; the processor marks the image
    tokens in `mm_token_type_ids`, and those blocks attend bidirectionally at prefill."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration, Molmo2Processor
    from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
    from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

    tokenizer = chatml_tokenizer(*MOLMO2_TOKENS)
    tokenizer.image_token, tokenizer.video_token = "<|image|>", "<|video|>"  # type: ignore[attr-defined]
    ids = token_ids(tokenizer, (*MOLMO2_TOKENS, "<|endoftext|>", "<|im_end|>"))
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      additional_vocab_size=0, qk_norm_type="qwen3")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, image_size=[32, 32], patch_size=8, num_position_embeddings=16)
    adapter = dict(vision_feature_layer=[-2, -1], hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=8, intermediate_size=2 * shape.hidden, text_hidden_size=shape.hidden)
    config = Molmo2Config(
        vision_config=vision, adapter_config=adapter, text_config=text,
        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"], frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )
    model = Molmo2ForConditionalGeneration(config)
    # the pooling attention and the MLP projector, at transformers' std 0.02 and with no norm between them, shrank
    # the image features to ~1e-9: every image gave the same logits
    fan_in_init(model.model.multi_modal_projector)
    image_processor = Molmo2ImageProcessor(size={"height": 32, "width": 32}, patch_size=8, max_crops=2,
                                           overlap_margins=[1, 1], pooling_size=[2, 2])
    processor = Molmo2Processor(image_processor=image_processor, video_processor=Molmo2VideoProcessor(),
                                tokenizer=tokenizer, chat_template=chatml_template("<|image|>"))
    return model, processor


STEP3_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")


def build_step3p7(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Step 3.7: a ViT of 4-pixel patches with a conv downsampler (two stride-2 convolutions: 16 tokens per
    64-pixel view), a linear projector, and a language model whose sliding-window layers have another head
    count than its global ones (`num_sliding_attention_heads`), a per-head sigmoid gate on each head's
    output before `o_proj`, q/k norms and MoE blocks. Images that fit the 64-pixel global view get no local
    crops: `<im_start>` 16 x `<im_patch>` `<im_end>`."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration, Step3p7Processor
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor

    tokenizer = chatml_tokenizer(*STEP3_TOKENS)
    ids = token_ids(tokenizer, (*STEP3_TOKENS, "<|endoftext|>", "<|im_end|>"))
    layer_types = (["sliding_attention", "full_attention"] * shape.layers)[: shape.layers]
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      layer_types=layer_types, sliding_window=8, num_sliding_attention_heads=2 * shape.heads,
                      mlp_layer_types=["dense"] + ["sparse"] * (shape.layers - 1), num_local_experts=4,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.hidden,
                      share_expert_dim=shape.hidden)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=4, max_position_embeddings=256)
    config = Step3p7Config(vision_config=vision, text_config=text, image_token_id=ids["<im_patch>"])
    model = Step3p7ForConditionalGeneration(config)
    image_processor = Step3p7ImageProcessor(size={"height": 64, "width": 64}, patch_size=48, max_image_size=128,
                                            vision_patch_size=4, downsampler_stride=4)
    processor = Step3p7Processor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=chatml_template("<im_patch>"))
    return model, processor


KIMI_TOKENS = ("<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>",
               "<|kimi_k25_video_placeholder|>")


def build_kimi_k25(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Kimi K2.5: a MoonViT-style tower (8-pixel patches, 2-D RoPE, 2x2 patch merge), a LayerNorm + MLP projector,
    and a DeepSeek-V3 language model: multi-head latent attention (queries and keys/values through low-rank
    latents; keys of `qk_nope + qk_rope` = 24 dims, values of 16), a dense first layer then MoE (4 routed
    experts, 1 shared). Each image is `<|media_begin|>image<|media_content|>` then one `<|media_pad|>` per merged
    patch group, then `<|media_end|>`."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration, Kimi_K25Processor
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    tokenizer = chatml_tokenizer(*KIMI_TOKENS)
    ids = token_ids(tokenizer, (*KIMI_TOKENS, "<|endoftext|>", "<|im_end|>"))
    text = dict(model_type="deepseek_v3", vocab_size=len(tokenizer), hidden_size=shape.hidden,
                intermediate_size=2 * shape.hidden, moe_intermediate_size=shape.hidden,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.heads, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=2048,
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
                tie_word_embeddings=False)
    vision = dict(patch_size=8, pos_emb_height=8, pos_emb_width=8, pos_emb_time=1, num_attention_heads=4,
                  num_hidden_layers=2, hidden_size=32, intermediate_size=64, merge_kernel_size=[2, 2])
    config = Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=32, image_token_id=ids["<|media_pad|>"],
        video_token_id=ids["<|kimi_k25_video_placeholder|>"], vision_start_token_id=ids["<|media_begin|>"],
        vision_end_token_id=ids["<|media_end|>"], tie_word_embeddings=False,
    )
    model = Kimi_K25ForConditionalGeneration(config)
    image_processor = Kimi_K25ImageProcessor(size={"max_height": 32, "max_width": 32}, patch_size=8, merge_size=2)
    processor = Kimi_K25Processor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Kimi_K25VideoProcessor(),
        chat_template=chatml_template("<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"),
    )
    return model, processor


# families whose processor takes one list of images per prompt
NESTED_IMAGES: frozenset[str] = frozenset()

BUILDERS: dict[str, Builder] = {
    "perception_lm": build_perception_lm,
    "fast_vlm": build_fast_vlm,
    "molmo2": build_molmo2,
    "step3p7": build_step3p7,
    "kimi_k25": build_kimi_k25,
}
