"""Tiny offline builds of the families whose image processor needs torchvision (no PIL backend).

Registered like `vlmfix.testing.tiny_families` (`BUILDERS`, `NESTED_IMAGES`), listed in
`vlmfix.testing.tiny.TORCHVISION_FAMILIES`; `build_tiny` checks that torchvision imports before it calls a
builder here, and their tests carry the `torchvision` marker (CI's second lane). Each builder imports
torchvision-backed classes inside its body, so this module imports without torchvision.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS, word_tokenizer
from vlmfix.testing.tiny_families import (
    DEEPSEEK_OCR_TEMPLATE,
    SAM_INIT,
    Builder,
    Shape,
    deepseek_ocr_text,
    token_ids,
)


def build_unlimited_ocr(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Unlimited OCR: DeepSeek-OCR's layout. A SAM tower (16-pixel patches, its neck and two stride-2 convolutions:
    a 2x2 map of a 128-pixel image) whose map is the patch input of a CLIP-like encoder; both outputs, concatenated,
    go through a linear `multi_modal_projector`; each row of features ends with `image_newline`, the image with
    `view_separator` (7 tokens). A DeepSeek-V2-style MoE language model with multi-head attention whose layers are
    reference sliding-window attention (every token sees the prompt and the last `sliding_window` tokens; a window of
    4 here, so decoding leaves it)."""
    from transformers import UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration, UnlimitedOcrProcessor
    from transformers.models.unlimited_ocr.image_processing_unlimited_ocr import UnlimitedOcrImageProcessor

    tokenizer, ids, text = deepseek_ocr_text(shape, sliding_window=4)
    sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4, image_size=128,
               patch_size=16, window_size=4, global_attn_indexes=[1], mlp_dim=64, downsample_channels=[24, 32],
               initializer_range=SAM_INIT)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=2,
                   patch_size=1)  # the SAM map (2x2, 32 channels) is its patch input
    config = UnlimitedOcrConfig(vision_config=dict(sam_config=sam, encoder_config=encoder), text_config=text,
                                image_token_id=ids["<image>"])
    model = UnlimitedOcrForConditionalGeneration(config)
    image_processor = UnlimitedOcrImageProcessor(size={"height": 128, "width": 128}, crop_to_patches=False)
    processor = UnlimitedOcrProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                                      downsample_ratio=4, chat_template=DEEPSEEK_OCR_TEMPLATE)
    return model, processor


MUSE_SPECIALS = ("<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>", "<unk>", "<|header_start|>",
                 "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|video|>",
                 "<|vid_frame_separator|>", "<|vid_start|>", "<|vid_end|>", "<|audio|>", "<|soft_audio_start|>",
                 "<|soft_audio_end|>", "user", "assistant")


def header_turns_template(image: str) -> str:
    """Llama 4's turn layout (<|header_start|>role<|header_end|>, turns ended by <|eot|>), writing `image` for each
    image item: Llama 4's <|image|>, which its processor expands to its tiles; Muse's <|patch|>, which its processor
    frames."""
    return (
        "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image +
        "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
    )


MUSE_TEMPLATE = header_turns_template("<|patch|>")  # the processor adds the frame


def header_turns_tokenizer(specials: tuple[str, ...], pad: str) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """A tokenizer of Llama 4's turn layout (bos <|begin_of_text|>, eos <|eot|>) with `specials` and `pad`, and
    the specials' ids."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(specials, WORDS), bos_token="<|begin_of_text|>", eos_token="<|eot|>",
        unk_token="<unk>", pad_token=pad, padding_side="left",
    )
    return tokenizer, token_ids(tokenizer, specials)


def muse_tokenizer() -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """Muse Glimmer's (and Muse Spark's) special tokens, Llama 4's turn layout."""
    return header_turns_tokenizer(MUSE_SPECIALS, "<|finetune_right_pad|>")


def muse_glimmer_configs(shape: Shape, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    """Muse Glimmer's text and vision configs and image ids, at the tiny size."""
    text = shape.text(vocab, pad_token_id=ids["<|finetune_right_pad|>"], eos_token_id=ids["<|eot|>"],
                      bos_token_id=ids["<|begin_of_text|>"], sliding_window=8)
    # 8-pixel patches, 2x2 merge; position table 8x8 patches, so a window is 64 pixels and an 80-pixel image spans four
    vision = dict(patch_size=8, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4, num_hidden_layers=2,
                  hidden_size=32, intermediate_size=64, merge_size=2, max_position_embeddings=64)
    return dict(text_config=text, vision_config=vision, image_token_id=ids["<|patch|>"],
                video_token_id=ids["<|video|>"], out_hidden_size=4 * 32, projector_hidden_size=64)


def muse_image_processor() -> Any:
    from transformers.models.muse_glimmer.image_processing_muse_glimmer import MuseGlimmerImageProcessor

    return MuseGlimmerImageProcessor(patch_size=8, merge_size=2, max_image_tokens=64)


def build_muse_glimmer(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Muse Glimmer: a windowed ViT (`vision_tower`, 2-D RoPE, pixel shuffle 2x2), an MLP `vision_adapter` and a
    linear `vision_projection`; a language model of sliding-window RoPE layers and full-attention NoPE layers (every
    4th from the last), soft-capped logits."""
    from transformers import MuseGlimmerConfig, MuseGlimmerForConditionalGeneration, MuseGlimmerProcessor
    from transformers.models.muse_glimmer.video_processing_muse_glimmer import MuseGlimmerVideoProcessor

    tokenizer, ids = muse_tokenizer()
    config = MuseGlimmerConfig(**muse_glimmer_configs(shape, len(tokenizer), ids))
    model = MuseGlimmerForConditionalGeneration(config)
    processor = MuseGlimmerProcessor(image_processor=muse_image_processor(),
                                     video_processor=MuseGlimmerVideoProcessor(), tokenizer=tokenizer,
                                     chat_template=MUSE_TEMPLATE)
    return model, processor


def build_muse_spark(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Muse Spark: Muse Glimmer's vision path and image processor, an `audio_tower` (strided convolutions) beside
    it, and an MoE language model whose layers mix each sublayer's output into the residual through a learned gate
    (residual gates); sliding-window RoPE layers and full-attention NoPE layers as in Muse Glimmer."""
    from transformers import MuseSparkConfig, MuseSparkForConditionalGeneration, MuseSparkProcessor
    from transformers.models.muse_glimmer.video_processing_muse_glimmer import MuseGlimmerVideoProcessor
    from transformers.models.muse_spark.feature_extraction_muse_spark import MuseSparkFeatureExtractor

    tokenizer, ids = muse_tokenizer()
    configs = muse_glimmer_configs(shape, len(tokenizer), ids)
    configs["text_config"].update(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.hidden,
                                  moe_hidden_size=shape.hidden)
    audio = dict(patch_sizes=[4, 4], hidden_sizes=[16, 32], depths=[1, 1], num_hidden_layers=2,
                 out_hidden_size=shape.hidden)
    config = MuseSparkConfig(**configs, audio_config=audio, audio_token_id=ids["<|audio|>"])
    model = MuseSparkForConditionalGeneration(config)
    processor = MuseSparkProcessor(image_processor=muse_image_processor(), video_processor=MuseGlimmerVideoProcessor(),
                                   tokenizer=tokenizer, feature_extractor=MuseSparkFeatureExtractor(),
                                   chat_template=MUSE_TEMPLATE)
    return model, processor


def build_gemma4_unified(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Gemma 4 Unified: encoder-free. Raw 12-pixel patches (4-pixel patches merged 3x3) go through `embed_vision`
    (layer norms, a dense layer, factorized 2-D position embeddings, the multimodal projection) straight into a
    Gemma 4 language model: sliding and global layers (the global ones twice as wide, one KV head, keys reused as
    values), the last layers reading an earlier layer's keys and values (shared KV), bidirectional attention inside
    each image block. The image processor's smallest budget (70 soft tokens) gives up to 64 image tokens."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedProcessor
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import Gemma4UnifiedVideoProcessor

    from vlmfix.testing.tiny_families import GEMMA4_TEMPLATE, gemma4_layer_types, gemma4_token_ids, gemma4_tokenizer

    tokenizer, ids = gemma4_tokenizer()
    layer_types, shared = gemma4_layer_types(shape.layers)
    text = shape.text(len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["<turn|>"], bos_token_id=ids["<bos>"],
                      global_head_dim=2 * shape.head_dim, sliding_window=16, layer_types=layer_types,
                      num_kv_shared_layers=shared, use_bidirectional_attention="vision",
                      attention_k_eq_v=True, num_global_key_value_heads=1)
    # output_proj_dims: the width the multimodal projection reads (the patch embedding's)
    vision = dict(patch_size=4, pooling_kernel_size=3, mm_embed_dim=32, mm_posemb_size=64, output_proj_dims=32)
    config = Gemma4UnifiedConfig(
        text_config=text, vision_config=vision, audio_config=None, **gemma4_token_ids(ids))
    model = Gemma4UnifiedForConditionalGeneration(config)
    image_processor = Gemma4UnifiedImageProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Gemma4UnifiedVideoProcessor(), chat_template=GEMMA4_TEMPLATE, image_seq_length=70,
    )
    return model, processor


APERTUS_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                    "<|assistant_end|>", "<|image|>", "<|img_start|>", "<|img_end|>", "<|img_token_start|>",
                    "<|img_end_of_row|>", "<|audio|>", "<|audio_start|>", "<|audio_end|>")
# the processor reads these tokenizer attributes (Apertus 1.5's tokenizer_config names them the same way)
APERTUS_ROLE_TOKENS = {"image_token": "<|image|>", "boi_token": "<|img_start|>", "eoi_token": "<|img_end|>",
                       "image_wrapper_token": "<|img_token_start|>", "eol_token": "<|img_end_of_row|>",
                       "audio_token": "<|audio|>", "boa_token": "<|audio_start|>", "eoa_token": "<|audio_end|>"}
APERTUS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}<|user_start|>"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|user_end|>{% else %}<|assistant_start|>{% for item in message['content'] %}"
    "{{ item['text'] }}{% endfor %}<|assistant_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)
APERTUS_VISUAL_CODES, APERTUS_AUDIO_CODES = 32, 16


def build_apertus1p5(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Apertus 1.5: no vision encoder in the usual sense and no projector. An encode-only VQGAN (five conv stages, so
    one code per 16x16 pixels: 9, 16 or 25 codes for the 48-, 64- and 80-pixel test images, whose sizes the
    processor keeps) turns each image into discrete codes; the codes, offset into the language model's vocabulary
    (`image_token_offset`), are embedded by its text embedding table and placed at the `<|image|>` placeholders,
    which the processor writes row by row (`<|img_start|>H*W<|img_token_start|>` rows ended by
    `<|img_end_of_row|>` ... `<|img_end|>`). A WavTokenizer encoder (audio codes, the same way) is built beside it
    and left unused by image prompts. The LM head keeps only the text rows (`output_vocab_size`), as the released
    checkpoints do, so no image code can be generated."""
    from transformers import Apertus1p5Config, Apertus1p5ForConditionalGeneration, Apertus1p5Processor
    from transformers.models.apertus1p5.image_processing_apertus1p5 import Apertus1p5ImageProcessor
    from transformers.models.wavtokenizer.feature_extraction_wavtokenizer import WavTokenizerFeatureExtractor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(APERTUS_SPECIALS, (*WORDS, *"0123456789", "*")), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
        extra_special_tokens=APERTUS_ROLE_TOKENS,
    )
    ids = token_ids(tokenizer, APERTUS_SPECIALS)
    words = len(tokenizer)  # text ids; the visual codes follow them, then the audio codes
    text = shape.text(words + APERTUS_VISUAL_CODES + APERTUS_AUDIO_CODES, output_vocab_size=words,
                      pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                      rope_parameters={"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                       "original_max_position_embeddings": 256, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0})
    vision = dict(codebook_size=APERTUS_VISUAL_CODES, embed_dim=8, latent_channels=8, base_channels=32,
                  channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], resolution=64)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2], hidden_size=8,
                 codebook_size=APERTUS_AUDIO_CODES, codebook_dim=8, num_lstm_layers=1, decoder_hidden_size=32,
                 decoder_intermediate_size=32, decoder_num_layers=1, decoder_attention_num_groups=4)
    config = Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio,
                              image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"],
                              image_token_offset=words, audio_token_offset=words + APERTUS_VISUAL_CODES)
    model = Apertus1p5ForConditionalGeneration(config)
    image_processor = Apertus1p5ImageProcessor(size={"min_pixels": 32 * 32, "max_pixels": 80 * 80}, spatial_factor=16)
    processor = Apertus1p5Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    feature_extractor=WavTokenizerFeatureExtractor(hop_length=4),
                                    chat_template=APERTUS_TEMPLATE)
    return model, processor


LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad_id|>", "<unk>", "<|header_start|>",
                   "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                   "<|tile_x_separator|>", "<|tile_y_separator|>", "user", "assistant")
LLAMA4_TEMPLATE = header_turns_template("<|image|>")  # the processor expands it to its tiles


def build_llama4(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Llama 4: a ViT (`vision_model`, 2-D RoPE, pixel shuffle 2x2 in its `vision_adapter`), a linear
    `multi_modal_projector`, and a language model (`language_model`, a Llama4ForCausalLM; the parts sit on the model
    itself) of chunked-attention RoPE layers (chunks of 8 here, so prompts and decoding cross chunk boundaries) and
    full-attention NoPE layers (every 2nd here; Llama 4's every 4th), MoE layers with a shared expert. An image is
    tiled: a 48-pixel image is one tile of 9 patch tokens; a larger one up to 4 tiles of 48 pixels (separated by
    tile tokens) and a global view after <|image|>. NoPE layers scale their queries with the position past
    `floor_scale` (8192) tokens; a tiny prompt stays below it."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    tokenizer, ids = header_turns_tokenizer(LLAMA4_SPECIALS, "<|finetune_right_pad_id|>")
    text = shape.text(len(tokenizer), pad_token_id=ids["<|finetune_right_pad_id|>"], eos_token_id=ids["<|eot|>"],
                      bos_token_id=ids["<|begin_of_text|>"], intermediate_size_mlp=2 * shape.hidden,
                      num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=8, no_rope_layer_interval=2)
    # the pixel shuffle (ratio 0.5) turns 32 channels into 128, the adapter's input
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                  patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=ids["<|patch|>"],
                          boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"])
    model = Llama4ForConditionalGeneration(config)
    image_processor = Llama4ImageProcessor(size={"height": 48, "width": 48}, max_patches=4)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                chat_template=LLAMA4_TEMPLATE)
    return model, processor


BUILDERS: dict[str, Builder] = {
    "unlimited_ocr": build_unlimited_ocr,
    "muse_glimmer": build_muse_glimmer,
    "muse_spark": build_muse_spark,
    "gemma4_unified": build_gemma4_unified,
    "apertus1p5": build_apertus1p5,
    "llama4": build_llama4,
}

# families whose processor takes one list of images per prompt
NESTED_IMAGES: frozenset[str] = frozenset({"gemma4_unified"})
