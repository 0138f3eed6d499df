"""Tiny offline builds of the families beyond the four reference ones (see `vlmfix.testing.tiny`).

Each builder returns (model, processor) for a language-model shape; `build_tiny` sets the attention
implementation, generation ids and eval mode. Vision towers are two layers of 32 channels; images
give a handful of tokens, so the conformance suite runs in seconds per family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlmfix.testing.tiny import WORDS, word_tokenizer


@dataclass(frozen=True)
class Shape:
    """The language model's shape."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def text(self, vocab: int, **extra: Any) -> dict[str, Any]:
        """Common text-config fields (Llama / Qwen2 / Mistral / Gemma naming)."""
        return dict(vocab_size=vocab, hidden_size=self.hidden, intermediate_size=2 * self.hidden,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, max_position_embeddings=2048,
                    **extra)


# (shape, **family options) -> (model, processor); options (larger images, ...) only where a builder names them
Builder = Callable[..., tuple[PreTrainedModel, ProcessorMixin]]

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system")


@torch.no_grad()
def randomise(weight: torch.Tensor, std: float = 0.02) -> None:
    """Draw a weight that transformers initialises to zeros (a trained checkpoint fills it) from N(0, std^2), with
    the global generator `build_tiny` seeds: the build stays deterministic, and the image reaches the logits."""
    weight.normal_(0.0, std)


@torch.no_grad()
def fan_in_init(module: nn.Module, gain: float = 1.0) -> None:
    """Draw every linear and convolution weight of `module` at std gain / sqrt(fan_in) (the global generator
    `build_tiny` seeds), so a deep stack without normalisation keeps its activations' scale: at transformers'
    std of 0.02 each such layer shrinks them ~10x and the image's trace vanishes (FastVLM's reparameterised
    convolutions, Molmo2's pooling and projector chain)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
            fan_in = layer.weight[0].numel()  # in_channels (/ groups) x kernel size
            layer.weight.normal_(0.0, gain / fan_in**0.5)


def token_ids(tokenizer: PreTrainedTokenizerFast, tokens: tuple[str, ...]) -> dict[str, Any]:
    """Each token's id under `tokenizer`."""
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in tokens}  # type: ignore[arg-type]


def small_qwen_image_processor(temporal_patch_size: int = 2) -> Any:
    """Qwen2-VL's PIL image processor at the tiny builds' size (8-pixel patches, 2x2 merge, 32-64 pixels a side),
    shared by the families that reuse Qwen's vision tower (`temporal_patch_size` 1 for a tower whose patch embedding
    takes one frame: LLaVA-OneVision-1.5's RICE-ViT)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                    temporal_patch_size=temporal_patch_size)


def chatml_template(image: str, system: str | None = None) -> str:
    """A ChatML template that writes `image` for each image item (and, given `system`, Qwen2-VL's way of opening a
    conversation that has no system message: a system turn with that text)."""
    opening = "" if system is None else (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}")
    return opening + (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image +
        "{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def chatml_tokenizer(*extra: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer((*CHATML_SPECIALS, *extra), WORDS), eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|endoftext|>", padding_side="left",
    )
    return tok


def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor, which needs torchvision (not installable beside the CPU
    torch build used here); images are processed exactly as by the stock class."""

    class DropVideoArgument(ProcessorMixin):
        """Between the stock class and `ProcessorMixin`: drops the `video_processor=None` argument that some
        processors pass on to `ProcessorMixin.__init__` (by name: Gemma 4; by position: Qwen2.5-Omni), which
        accepts only the attributes left."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(processor_class.get_attributes(), args))  # the stock order, video included
            kwargs.pop("video_processor", None)
            super().__init__(**kwargs)

    class ImageOnly(processor_class, DropVideoArgument):  # type: ignore[valid-type,misc]
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if "video" not in name]

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


def siglip_config(image_size: int = 32, patch_size: int = 8) -> dict[str, Any]:
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=patch_size)


def build_llava_onevision(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = chatml_tokenizer("<image>", "<video>")
    ids = token_ids(tokenizer, ("<image>", "<video>", "<|endoftext|>", "<|im_end|>"))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=siglip_config(),
        text_config=dict(model_type="qwen2", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=chatml_template("<image>\n"),
    )
    return model, processor


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _qwen3_vl(shape: Shape, moe: bool, *, image_side: int = 0, patch_size: int = 8, vision_depth: int = 2,
              deepstack_layers: tuple[int, ...] = (0,)) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen3-VL; `image_side` > 0 resizes every image to that square (else to 32..64 px sides), `patch_size`,
    `vision_depth` and `deepstack_layers` (the vision blocks whose features DeepStack adds to the first decoder
    layers) shape the vision tower."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = chatml_tokenizer(*QWEN_VISION_TOKENS)
    ids = token_ids(tokenizer, (*QWEN_VISION_TOKENS, "<|endoftext|>", "<|im_end|>"))
    half = shape.head_dim // 2
    text = shape.text(
        len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                         "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.hidden, decoder_sparse_step=1)
    side = image_side // patch_size if image_side else 4  # patches per side of the position-embedding grid
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=shape.hidden,
                  num_position_embeddings=side * side,
                  deepstack_visual_indexes=list(deepstack_layers))  # DeepStack: block k's features join decoder layer k
    common: dict[str, Any] = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if moe:
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        model: PreTrainedModel = Qwen3VLMoeForConditionalGeneration(
            Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common))
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **common))
    low, high = (image_side, image_side) if image_side else (32, 64)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=low * low, max_pixels=high * high, patch_size=patch_size,
                                               merge_size=2, temporal_patch_size=2)
    processor = image_only(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return model, processor


def build_qwen3_vl(shape: Shape, **vision: Any) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _qwen3_vl(shape, moe=False, **vision)


def build_qwen3_vl_moe(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _qwen3_vl(shape, moe=True)


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>", "user", "model")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<start_of_image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3(shape: Shape, *, image_size: int = 32, patch_size: int = 8, tokens_per_image: int = 4,
                 sliding_window: int = 16, global_every: int | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Gemma 3: sliding-window layers (window 16: the prompt's last token still sees the image, decoding steps
    and the longer row cross the window) and one global layer; the image
    block attends bidirectionally (token_type_ids).

    Options (benchmarks): `image_size` / `patch_size` of the SigLIP tower, `tokens_per_image` (a square number
    the patch grid pools to), `sliding_window`, and `global_every` (every k-th layer global, Gemma 3's 6, the last
    layer made global when that leaves none; None: only the last layer is global)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(GEMMA_SPECIALS, WORDS), bos_token="<bos>", eos_token="<end_of_turn>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    ids = token_ids(tokenizer, GEMMA_SPECIALS)
    for name, token in (("boi", "<start_of_image>"), ("eoi", "<end_of_image>"), ("image", "<image_soft_token>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    every = global_every or shape.layers
    layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(shape.layers)]
    if "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    text = shape.text(len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["<end_of_turn>"],
                      bos_token_id=ids["<bos>"], query_pre_attn_scalar=shape.head_dim, sliding_window=sliding_window,
                      layer_types=layer_types)
    config = Gemma3Config(
        text_config=text, vision_config=siglip_config(image_size, patch_size), mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers zero-initialises the projection: every image would give zero features
    randomise(model.model.multi_modal_projector.mm_input_projection_weight, config.get_text_config().initializer_range)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=tokens_per_image)
    return model, processor


INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")


def build_internvl(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """InternVL (HF-native): InternViT, pixel-shuffle projector (a 32-pixel image gives 4 tokens), Qwen2."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = chatml_tokenizer(*INTERNVL_TOKENS)
    ids = token_ids(tokenizer, (*INTERNVL_TOKENS, "<|endoftext|>", "<|im_end|>"))
    for name, token in (("start_image", "<img>"), ("end_image", "</img>"), ("context_image", "<IMG_CONTEXT>"),
                        ("video", "<video>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4, downsample_ratio=0.5,
        tie_word_embeddings=False,  # tied random embeddings make every step pick the same token
    )
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    processor = image_only(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
        chat_template=chatml_template("<IMG_CONTEXT>\n"),
    )
    return model, processor


AYA_SPECIALS = ("<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
                "<image>", "<unk>", "TILE", "TILE_GLOBAL")
AYA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>{{ '<|USER_TOKEN|>' if message['role'] == "
    "'user' else '<|CHATBOT_TOKEN|>' }}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


def build_aya_vision(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Aya Vision: SigLIP, pixel-shuffle projector (4 tokens per 32-pixel tile), Cohere 2 with sliding layers."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(AYA_SPECIALS, WORDS), bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>", unk_token="<unk>", pad_token="<PAD>", padding_side="left",
    )
    ids = token_ids(tokenizer, AYA_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["<PAD>"], eos_token_id=ids["<|END_OF_TURN_TOKEN|>"],
                      bos_token_id=ids["<BOS_TOKEN>"], sliding_window=16, logit_scale=1.0,
                      initializer_range=0.2,  # with the default scale every step picks the same token
                      layer_types=["sliding_attention"] * (shape.layers - 1) + ["full_attention"])
    config = AyaVisionConfig(
        vision_config=siglip_config(), text_config=dict(model_type="cohere2", **text), downsample_factor=2,
        image_token_index=ids["<|IMG_PATCH|>"], vision_feature_layer=-1,
        tie_word_embeddings=False,  # tied random embeddings make every step pick the same token
    )
    model = AyaVisionForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, img_size=32,
                                   downsample_factor=2, chat_template=AYA_TEMPLATE)
    return model, processor


IDEFICS_SPECIALS = ("<pad>", "<|begin_of_text|>", "<end_of_utterance>", "<unk>", "<fake_token_around_image>",
                    "<image>", "<global-img>", "User", "Assistant")
IDEFICS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _idefics3(shape: Shape, smolvlm: bool) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Idefics3 / SmolVLM: SigLIP-style `vision_model`, pixel-shuffle `connector` (4 tokens per 32-pixel image),
    Llama `text_model`; each image is wrapped in <fake_token_around_image><global-img> ... <fake_token_around_image>."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(IDEFICS_SPECIALS, WORDS), bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    ids = token_ids(tokenizer, IDEFICS_SPECIALS)
    text = dict(model_type="llama", **shape.text(len(tokenizer), pad_token_id=ids["<pad>"],
                                                  eos_token_id=ids["<end_of_utterance>"],
                                                  bos_token_id=ids["<|begin_of_text|>"]))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if smolvlm:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        model: PreTrainedModel = SmolVLMForConditionalGeneration(SmolVLMConfig(
            vision_config=vision, text_config=text, scale_factor=2, image_token_id=ids["<image>"]))
    else:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        model = Idefics3ForConditionalGeneration(Idefics3Config(
            vision_config=vision, text_config=text, scale_factor=2, image_token_id=ids["<image>"]))
    # SmolVLM's own processor needs `num2words` (video timestamps); for images it writes the same prompt as
    # Idefics3's, which serves both here
    image_size = {"longest_edge": 32}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size=image_size, max_image_size=image_size,
                                                  do_image_splitting=False),
        tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return model, processor


def build_idefics2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Idefics2: SigLIP-style `vision_model`, a perceiver resampler `connector` (4 latents per image),
    Mistral `text_model`; each image is wrapped in <fake_token_around_image>."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(IDEFICS_SPECIALS, WORDS), bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    ids = token_ids(tokenizer, IDEFICS_SPECIALS)
    text = dict(model_type="mistral", **shape.text(len(tokenizer), pad_token_id=ids["<pad>"],
                                                    eos_token_id=ids["<end_of_utterance>"],
                                                    bos_token_id=ids["<|begin_of_text|>"]))
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        perceiver_config=dict(hidden_size=shape.hidden, resampler_n_latents=4, resampler_depth=1,
                              resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2),
        text_config=text, image_token_id=ids["<image>"],
    )
    model = Idefics2ForConditionalGeneration(config)
    image_size = {"longest_edge": 32, "shortest_edge": 32}
    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(size=image_size, do_image_splitting=False),
        tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return model, processor


def build_idefics3(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _idefics3(shape, smolvlm=False)


def build_smolvlm(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _idefics3(shape, smolvlm=True)


GLM_SPECIALS = ("<|endoftext|>", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>",
                "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>", "<unk>")
GLM_TEMPLATE = (
    "<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _glm(shape: Shape, kind: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """GLM-4.1V / GLM-4.5V (MoE) / GLM-4.6V / GLM-OCR: a Qwen-style vision tower and merger, M-RoPE over half of each
    head (partial rotary)."""
    import transformers
    from transformers import Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(GLM_SPECIALS, WORDS), eos_token="<|user|>", unk_token="<unk>",
        pad_token="<|endoftext|>", padding_side="left",
    )
    ids = token_ids(tokenizer, GLM_SPECIALS)
    quarter = shape.head_dim // 4  # rotary half-width with partial_rotary_factor 0.5
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|user|>"],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                       "mrope_section": [quarter - 2 * (quarter // 4), quarter // 4, quarter // 4]})
    text.pop("head_dim")
    if kind == "glm4v_moe":  # layer 0 dense, the others 4 routed experts (2 per token) and a shared one
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.hidden,
                    first_k_dense_replace=1, n_shared_experts=1)
    prefix = {"glm4v": "Glm4v", "glm4v_moe": "Glm4vMoe", "glm46v": "Glm46V", "glm_ocr": "GlmOcr"}[kind]
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, image_size=32, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, out_hidden_size=shape.hidden, intermediate_size=64),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=8,
                                             merge_size=2, temporal_patch_size=2)
    processor = image_only(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=GLM_TEMPLATE)  # the four share its prompt layout
    return model, processor


def build_glm4v(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _glm(shape, "glm4v")


def build_glm4v_moe(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _glm(shape, "glm4v_moe")


def build_glm46v(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _glm(shape, "glm46v")


def build_glm_ocr(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    return _glm(shape, "glm_ocr")


PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def build_paligemma(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """PaliGemma: SigLIP (16 tokens per 32-pixel image), a linear projector, Gemma; no chat template: the
    prompt is `<image>×N<bos>{text}\\n` and the newline ends the instruction."""
    from tokenizers import AddedToken
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(specials, WORDS), bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("\n", special=True, normalized=False)]})
    tokenizer.image_token = "<image>"
    ids = token_ids(tokenizer, specials)
    tokenizer.image_token_id = ids["<image>"]
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # type: ignore[attr-defined]  # what PaliGemmaProcessor reads
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_TEMPLATE)  # adds its <loc…>/<seg…> tokens
    text = shape.text(len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
    config = PaliGemmaConfig(vision_config=siglip_config(), text_config=dict(model_type="gemma", **text),
                             image_token_index=ids["<image>"], projection_dim=shape.hidden,
                             tie_word_embeddings=False)  # tied random embeddings repeat one token
    return PaliGemmaForConditionalGeneration(config), processor


MISTRAL_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}[/INST]{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


class PixtralLayoutProcessor(ProcessorMixin):
    """Pixtral's prompt layout for Mistral 3, offline: each [IMG] becomes rows of [IMG] tokens (one per
    merged patch), each row ended by [IMG_BREAK] and the last by [IMG_END]. transformers' PixtralProcessor
    writes the same layout but cannot be imported without torchvision."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, token_patch: int = 16,
                 chat_template: str | None = None) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.token_patch = token_patch  # pixels per image token (vision patch x spatial merge)
        self.image_token = "[IMG]"

    def __call__(self, text: list[str], images: list[Any] | None = None, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        pixels: dict[str, Any] = {}
        if images:
            pixels = dict(self.image_processor(images, patch_size=self.token_patch, return_tensors="pt"))
        sizes = iter(pixels.get("image_sizes", []))
        prompts = []
        for prompt in text:
            parts = prompt.split("[IMG]")
            expanded = parts[0]
            for part in parts[1:]:
                height, width = (int(x) // self.token_patch for x in next(sizes))
                rows = ["[IMG]" * width] * height
                expanded += "[IMG_BREAK]".join(rows) + "[IMG_END]" + part
            prompts.append(expanded)
        encoded = self.tokenizer(prompts, return_tensors=kwargs.get("return_tensors"), padding=kwargs.get("padding"))
        return BatchFeature({**encoded, **pixels})


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral 3's word tokenizer: its specials, and [INST] / [/INST] and Pixtral's image tokens as special tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(MISTRAL_SPECIALS, WORDS), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]",
                                                                "[IMG_END]"]})
    return tokenizer


def build_mistral3(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Mistral 3: Pixtral vision (2-D RoPE), a 2x2 patch merger in the projector, Mistral."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = mistral_tokenizer()
    ids = token_ids(tokenizer, MISTRAL_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"], bos_token_id=ids["<s>"])
    config = Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=8, image_size=32, patch_size=8),
        text_config=dict(model_type="mistral", **text), image_token_index=ids["[IMG]"], spatial_merge_size=2,
        vision_feature_layer=-1, tie_word_embeddings=False,  # tied random embeddings repeat one token
    )
    model = Mistral3ForConditionalGeneration(config)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=16)
    return model, PixtralLayoutProcessor(image_processor, tokenizer, token_patch=16, chat_template=MISTRAL_TEMPLATE)


def build_vipllava(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """ViP-LLaVA: LLaVA-1.5's layout with the projector reading several CLIP layers at once."""
    from transformers import LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vlmfix.testing.tiny import LLAVA_TEMPLATE, _clip_config, _fast_tokenizer, _llama_text_config

    tokenizer = _fast_tokenizer("llava")
    tokenizer.image_token = "<image>"
    text = _llama_text_config(len(tokenizer), shape.layers, shape.heads, shape.kv_heads, shape.head_dim)
    config = VipLlavaConfig(vision_config=_clip_config(32, 8), text_config=text,
                            image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
                            vision_feature_layer=[-2, -1], image_seq_length=16)
    model = VipLlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


LIGHTON_TOKENS = ("<|image_pad|>", "<|vision_pad|>", "<|vision_end|>")
# LightOnOCR's prompt layout (its checkpoint's template): ChatML turns after an empty system turn (unless the
# conversation opens with one), each image one <|image_pad|>, each text followed by a line break
LIGHTON_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_pad|>{% else %}{{ item['text'] }}\n{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_lighton_ocr(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LightOnOCR: Pixtral vision (`vision_encoder`), a 2x2 merger (`vision_projection`), Qwen3; Pixtral's
    rows of image tokens ended by a break token, the image by an end token."""
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration, LightOnOcrProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = chatml_tokenizer(*LIGHTON_TOKENS)
    ids = token_ids(tokenizer, (*LIGHTON_TOKENS, "<|endoftext|>", "<|im_end|>"))
    for name, token in (("image", "<|image_pad|>"), ("image_break", "<|vision_pad|>"), ("image_end", "<|vision_end|>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = LightOnOcrConfig(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=8, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen3", **text), image_token_id=ids["<|image_pad|>"], spatial_merge_size=2,
        tie_word_embeddings=False,  # tied random embeddings repeat one token
    )
    model = LightOnOcrForConditionalGeneration(config)
    processor = LightOnOcrProcessor(image_processor=PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=16),
                                    tokenizer=tokenizer, patch_size=8, spatial_merge_size=2,
                                    chat_template=LIGHTON_TEMPLATE)
    return model, processor


EXAONE_SPECIALS = ("[PAD]", "<|endofturn|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<vision>",
                   "</vision>", "<|image_pad|>", "<|video_pad|>")
# EXAONE 4.5's prompt layout: role headers, turns ended by <|endofturn|>, each image <vision> <|image_pad|>... </vision>
EXAONE_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<vision><|image_pad|></vision>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|endofturn|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_exaone4_5(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """EXAONE 4.5: Qwen2.5-VL's vision tower (windowed, GQA attention), EXAONE 4 with sliding-window layers;
    EXAONE's prompt layout and image wrapping."""
    from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, Exaone4_5_Processor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(EXAONE_SPECIALS, WORDS), eos_token="<|endofturn|>", unk_token="<unk>",
        pad_token="[PAD]", padding_side="left",
    )
    ids = token_ids(tokenizer, EXAONE_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["[PAD]"], eos_token_id=ids["<|endofturn|>"],
                      bos_token_id=None, sliding_window=16,
                      layer_types=["sliding_attention"] * (shape.layers - 1) + ["full_attention"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, num_key_value_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=shape.hidden, window_size=32,
                  fullatt_block_indexes=[1])
    config = Exaone4_5_Config(text_config=dict(model_type="exaone4", **text), vision_config=vision,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    model = Exaone4_5_ForConditionalGeneration(config)
    image_processor = small_qwen_image_processor()
    processor = image_only(Exaone4_5_Processor)(image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=EXAONE_TEMPLATE)
    return model, processor


def build_llava_onevision1_5(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-OneVision-1.5: a RICE-ViT vision tower (`visual`: one class token per image, 2-D rotary positions, its
    `merger` merging 2x2 patches) over Qwen2-VL's patch grid, Qwen3 with 1-D positions; EXAONE 4.5's processor and
    model class with Qwen's image wrapping. Its chat template is Qwen2-VL's (a default system message, each image
    <|vision_start|><|image_pad|><|vision_end|> right before the text), as the prompt ids and decoded prompts of
    transformers' integration tests of Deep-VLM/LLaVA-OneVision-1.5-4B-Instruct-hf show; the template file itself was
    not read."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration
    from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor

    tokenizer = chatml_tokenizer(*QWEN_VISION_TOKENS)
    ids = token_ids(tokenizer, (*QWEN_VISION_TOKENS, "<|endoftext|>", "<|im_end|>"))
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                  out_hidden_size=shape.hidden)
    config = LlavaOnevision15Config(
        text_config=dict(model_type="qwen3", **text), vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    model = LlavaOnevision15ForConditionalGeneration(config)
    processor = image_only(Exaone4_5_Processor)(
        image_processor=small_qwen_image_processor(temporal_patch_size=1), tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                      system="You are a helpful assistant."),
    )
    return model, processor


DEEPSEEK_SPECIALS = ("<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>", "<image_placeholder>",
                     "User", "Assistant")
# DeepSeek-VL's prompt layout (the checkpoints' template, as transformers' DeepSeek-VL and DeepSeek-VL hybrid processor
# tests write it): the system text, a blank line, "User: ", each image, the question, a blank line and "Assistant:"
# (a turn's separator, the blank line or EOS, only before another turn).
# The real tokenizer adds BOS when it encodes; this word-level one does not, so the template writes it. The line
# breaks are Jinja string literals: a line break right after a block tag is dropped (trim_blocks).
DEEPSEEK_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                   "that the user provides, and assist the user with a variety of tasks using natural language.")
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}" + DEEPSEEK_SYSTEM + "{{ '\\n\\n' }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image_placeholder>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n\\n' }}{% endif %}{% else %}{{ 'Assistant: ' }}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def deepseek_text(shape: Shape) -> tuple[PreTrainedTokenizerFast, dict[str, int], dict[str, Any]]:
    """DeepSeek-VL's tokenizer (both variants), its special ids and the Llama text settings."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(DEEPSEEK_SPECIALS, WORDS), bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", unk_token="<unk>", pad_token="<｜▁pad▁｜>", padding_side="left",
    )
    tokenizer.image_token = "<image_placeholder>"
    ids = token_ids(tokenizer, DEEPSEEK_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["<｜▁pad▁｜>"], eos_token_id=ids["<｜end▁of▁sentence｜>"],
                      bos_token_id=ids["<｜begin▁of▁sentence｜>"])
    return tokenizer, ids, text


# SAM configs' initializer_range defaults to 1e-10, which leaves random weights near zero: no image would change the
# features (GOT-OCR 2, Unlimited OCR, DeepSeek-OCR-2, DeepSeek-VL hybrid's high-res tower)
SAM_INIT = 0.02

DEEPSEEK_OCR_SPECIALS = ("<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>", "<image>", "User",
                         "Assistant")
# DeepSeek-OCR's prompt layout (DeepSeek-OCR, DeepSeek-OCR-2 and Unlimited OCR): the official inference code formats
# the conversation in the "plain" style, no role names and no assistant turn, only the user's text, in which each
# image is an `<image>` line; the tokenizer's BOS comes first. transformers' conversions ship no chat template (their
# examples pass "<image>\\nFree OCR." to the processor). The line break is a Jinja string literal (trim_blocks).
DEEPSEEK_OCR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% else %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def deepseek_ocr_text(shape: Shape, **extra: Any) -> tuple[PreTrainedTokenizerFast, dict[str, int], dict[str, Any]]:
    """DeepSeek-OCR's tokenizer (Unlimited OCR and DeepSeek-OCR-2 share it), its special ids and the settings of a
    DeepSeek-V2 MoE language model with multi-head attention (4 routed experts, 2 a token, 1 shared; `extra` adds)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(DEEPSEEK_OCR_SPECIALS, WORDS), bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", unk_token="<unk>", pad_token="<｜▁pad▁｜>", padding_side="left",
    )
    ids = token_ids(tokenizer, DEEPSEEK_OCR_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["<｜▁pad▁｜>"], eos_token_id=ids["<｜end▁of▁sentence｜>"],
                      bos_token_id=ids["<｜begin▁of▁sentence｜>"], n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, moe_intermediate_size=shape.hidden, **extra)
    text.pop("head_dim")  # hidden_size // heads
    return tokenizer, ids, text


def build_deepseek_ocr2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """DeepSeek-OCR-2: a SAM tower (2-pixel patches of a 96-pixel view, one windowed layer; its neck and two
    stride-2 convolutions make the 48x48 map 12x12 patches) whose patches, then learned queries, go through a
    Qwen2-style encoder (bidirectional over the patches, causal over the queries); the queries' outputs, through a
    linear `multi_modal_projector`, then `view_separator`, are the image's 145 tokens. transformers fixes the query
    tables at 144 and 256 rows whatever the config (`DeepseekOcr2VisionModel`: a view of up to 144 patches takes the
    144 queries, a larger one the 256), so a view gives 144 tokens at the least; the processor counts them from its
    size, patch size and downsampling (96 / 2 / 4: 12 a side). An image larger than a view also comes as 96-pixel
    tiles of 144 tokens each (tests/test_deepseek_ocr2.py; the conformance suite's images are smaller: one view).
    A DeepSeek-V2 MoE language model, its first layer dense."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    tokenizer, ids, text = deepseek_ocr_text(shape, mlp_layer_types=["dense"] + ["sparse"] * (shape.layers - 1))
    side, patch = 96, 2
    sam = dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=side,
               patch_size=patch, window_size=12, global_attn_indexes=[], mlp_dim=32, downsample_channels=[24, 32],
               initializer_range=SAM_INIT)
    # the patches' width (downsample_channels[-1]) is the encoder's, which its queries share
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2)
    config = DeepseekOcr2Config(vision_config=dict(sam_config=sam, encoder_config=encoder), text_config=text,
                                image_token_id=ids["<image>"])
    image_processor = DeepseekOcr2ImageProcessorPil(size={"height": side, "width": side}, tile_size=side)
    processor = DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                      downsample_ratio=4, chat_template=DEEPSEEK_OCR_TEMPLATE)
    return DeepseekOcr2ForConditionalGeneration(config), processor


def build_deepseek_vl(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """DeepSeek-VL: SigLIP `vision_model` (16 tokens per 32-pixel image), an MLP `aligner`, Llama."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    tokenizer, ids, text = deepseek_text(shape)
    config = DeepseekVLConfig(vision_config=siglip_config(), text_config=dict(model_type="llama", **text),
                              image_token_id=ids["<image_placeholder>"], tie_word_embeddings=False)
    model = DeepseekVLForConditionalGeneration(config)
    processor = DeepseekVLProcessor(image_processor=DeepseekVLImageProcessorPil(size={"height": 32, "width": 32}),
                                    tokenizer=tokenizer, num_image_tokens=16, chat_template=DEEPSEEK_TEMPLATE)
    return model, processor


COHERE_VISION_SPECIALS = ("<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                          "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                          "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "<image>", "<unk>")


def _one_tile_image_processor(tokens_per_side: int) -> Any:
    """One 32-pixel tile per image, reported as `num_patches` with `patch_size` tokens per tile side, as
    Cohere2Vision's processor reads them; its own image processor needs torchvision, not installable here."""
    import torch
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    class OneTileImageProcessor(SiglipImageProcessorPil):
        def preprocess(self, images: Any, **kwargs: Any) -> Any:
            out = super().preprocess(images, **kwargs)
            out["num_patches"] = torch.ones(len(out["pixel_values"]), dtype=torch.long)
            return out

    processor = OneTileImageProcessor(size={"height": 32, "width": 32})
    processor.patch_size = tokens_per_side  # type: ignore[attr-defined]
    return processor


def build_cohere2_vision(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Command A Vision: SigLIP, a pixel-shuffle projector (4 tokens per 32-pixel tile, each tile ended by a
    line break), Cohere 2 with sliding layers."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, Cohere2VisionProcessor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(COHERE_VISION_SPECIALS, WORDS), bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>", unk_token="<unk>", pad_token="<PAD>", padding_side="left",
    )
    ids = token_ids(tokenizer, COHERE_VISION_SPECIALS)
    for name, token in (("boi", "<|START_OF_IMG|>"), ("eoi", "<|END_OF_IMG|>"), ("image", "<|IMG_PATCH|>"),
                        ("img_line_break", "<|IMG_LINE_BREAK|>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    text = shape.text(len(tokenizer), pad_token_id=ids["<PAD>"], eos_token_id=ids["<|END_OF_TURN_TOKEN|>"],
                      bos_token_id=ids["<BOS_TOKEN>"], sliding_window=16, logit_scale=1.0,
                      initializer_range=0.2,  # with the default scale every step picks the same token
                      layer_types=["sliding_attention"] * (shape.layers - 1) + ["full_attention"])
    config = Cohere2VisionConfig(
        vision_config=siglip_config(), text_config=dict(model_type="cohere2", **text), downsample_factor=2,
        image_token_id=ids["<|IMG_PATCH|>"], alignment_intermediate_size=2 * shape.hidden, tie_word_embeddings=False,
    )
    model = Cohere2VisionForConditionalGeneration(config)
    processor = Cohere2VisionProcessor(image_processor=_one_tile_image_processor(2), tokenizer=tokenizer,
                                       chat_template=AYA_TEMPLATE.replace("<image>", "<|IMG_PATCH|>"))
    return model, processor


def build_llava_next_video(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-NeXT-Video on images: LLaVA-NeXT's AnyRes layout (its video pooling is not exercised); the
    images go through LlavaNextProcessor, whose image prompt LlavaNextVideoProcessor shares (that one
    needs a video processor, hence torchvision)."""
    from transformers import LlavaNextProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlmfix.testing.tiny import LLAVA_SPECIALS, LLAVA_TEMPLATE, _clip_config, _llama_text_config

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer((*LLAVA_SPECIALS, "<video>"), WORDS), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    tokenizer.image_token = "<image>"
    ids = token_ids(tokenizer, ("<image>", "<video>"))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextVideoConfig(
        vision_config=_clip_config(32, 8),
        text_config=_llama_text_config(len(tokenizer), shape.layers, shape.heads, shape.kv_heads, shape.head_dim),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                   num_additional_image_tokens=1)
    return model, processor


def build_video_llava(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Video-LLaVA on images: an `image_tower` (and a `video_tower`) before LLaVA's projector; images go
    through LlavaProcessor, whose image prompt VideoLlavaProcessor shares (that one needs a video processor)."""
    from transformers import LlavaProcessor, VideoLlavaConfig, VideoLlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vlmfix.testing.tiny import LLAVA_SPECIALS, LLAVA_TEMPLATE, _clip_config, _llama_text_config

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer((*LLAVA_SPECIALS, "<video>"), WORDS), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    tokenizer.image_token = "<image>"
    ids = token_ids(tokenizer, ("<image>", "<video>"))
    config = VideoLlavaConfig(
        vision_config=_clip_config(32, 8),
        text_config=_llama_text_config(len(tokenizer), shape.layers, shape.heads, shape.kv_heads, shape.head_dim),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=16,
    )
    model = VideoLlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


GOT_OCR_TOKENS = ("<img>", "</img>", "<imgpad>")


def build_got_ocr2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """GOT-OCR 2: a SAM vision encoder (windowed and global layers), two strided convolutions in the projector
    (a 64-pixel image gives 2x2 tokens), Qwen2; each image is wrapped in <img> ... </img>."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = chatml_tokenizer(*GOT_OCR_TOKENS)
    ids = token_ids(tokenizer, (*GOT_OCR_TOKENS, "<|endoftext|>", "<|im_end|>"))
    config = GotOcr2Config(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                           initializer_range=SAM_INIT),
        text_config=dict(model_type="qwen2", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        image_token_index=ids["<imgpad>"], image_seq_length=4,
        tie_word_embeddings=False,  # tied random embeddings make every step pick the same token
    )
    model = GotOcr2ForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=False)
    processor = GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=chatml_template("<img><imgpad></img>\n"))
    processor.num_image_tokens = 4  # type: ignore[attr-defined]  # the projector's 2x2 output
    return model, processor


COMPASS_TOKENS = ("<|VISION_START|>", "<|VISION_END|>", "<|IMAGE_PAD|>", "<|VIDEO_PAD|>")


def build_cohere_compass(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Cohere Compass (North Vision): Qwen3-VL's vision tower, DeepStack and interleaved M-RoPE, under a
    Cohere 2 language model whose rotary parameters are given per layer type (sliding and full layers).

    Template: Aya Vision's turns with the image as <|VISION_START|><|IMAGE_PAD|><|VISION_END|>. Verified: those
    image tokens (transformers' CohereCompassProcessor and its tests) and that the checkpoint's tokenizer
    (CohereTokenizer) stops on <|END_OF_TURN_TOKEN|> (mlx-vlm runs of mlx-community/North-Micro-Vision-Instruct-4bit),
    the token that ends each turn in Cohere's templates and the adapter's marker. Not verified:
    CohereLabs/North-Micro-Vision-Instruct's chat_template.jinja itself (not public where searched: its system
    preamble, if any, and the tokens that open the chatbot's turn)."""
    from transformers import (
        CohereCompassConfig,
        CohereCompassForConditionalGeneration,
        CohereCompassProcessor,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer((*COHERE_VISION_SPECIALS, *COMPASS_TOKENS), WORDS), bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>", unk_token="<unk>", pad_token="<PAD>", padding_side="left",
    )
    ids = token_ids(tokenizer, (*COHERE_VISION_SPECIALS, *COMPASS_TOKENS))
    half = shape.head_dim // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    text = shape.text(len(tokenizer), pad_token_id=ids["<PAD>"], eos_token_id=ids["<|END_OF_TURN_TOKEN|>"],
                      bos_token_id=ids["<BOS_TOKEN>"], sliding_window=16, logit_scale=1.0,
                      initializer_range=0.2,  # with the default scale every step picks the same token
                      layer_types=["sliding_attention"] * (shape.layers - 1) + ["full_attention"],
                      rope_parameters={"sliding_attention": dict(rope), "full_attention": dict(rope)})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=shape.hidden, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = CohereCompassConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|IMAGE_PAD|>"],
        video_token_id=ids["<|VIDEO_PAD|>"], vision_start_token_id=ids["<|VISION_START|>"],
        vision_end_token_id=ids["<|VISION_END|>"], tie_word_embeddings=False,
    )
    model = CohereCompassForConditionalGeneration(config)
    image_processor = small_qwen_image_processor()
    processor = image_only(CohereCompassProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=AYA_TEMPLATE.replace("<image>", "<|VISION_START|><|IMAGE_PAD|><|VISION_END|>"),
    )
    return model, processor


def build_cosmos3_edge(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Cosmos3-Edge: a packed SigLIP2 vision tower (`visual`), a 2x2 patch-merging MLP `projector`, a Llama-style
    language model with M-RoPE; Qwen2-VL's prompt layout and rotary index.

    Template: plain ChatML, each image as <|vision_start|><|image_pad|><|vision_end|>. Verified: the image tokens
    (transformers' Cosmos3EdgeProcessor; its docstring: the Edge template writes a video as
    <|vision_start|><|video_pad|><|vision_end|>) and, from the hub's record of nvidia/Cosmos3-Edge, the tokenizer's
    eos <|im_end|> (the adapter's marker) and the opening of the checkpoint's chat template, which is
    NVIDIA-Nemotron-3-Nano's (`enable_thinking` on by default, `truncate_history_thinking`). Not verified: the rest of
    that 12 kB template (read only in part): Nemotron 3 Nano's always writes a system turn, empty when none is given,
    and opens the answer with "<think>\n" (or "<think></think>" without thinking); the tiny template writes neither,
    and the instruction span ends at <|im_end|> either way."""
    from transformers import Cosmos3EdgeConfig, Cosmos3EdgeForConditionalGeneration, Cosmos3EdgeProcessor
    from transformers.models.cosmos3_edge.image_processing_pil_cosmos3_edge import Cosmos3EdgeImageProcessorPil

    tokenizer = chatml_tokenizer(*QWEN_VISION_TOKENS)
    ids = token_ids(tokenizer, (*QWEN_VISION_TOKENS, "<|endoftext|>", "<|im_end|>"))
    half = shape.head_dim // 2
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [half - 2 * (half // 3), half // 3,
                                                                            half // 3]})
    config = Cosmos3EdgeConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, num_patches=16, spatial_merge_size=2),
        projector_hidden_size=2 * shape.hidden, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Cosmos3EdgeForConditionalGeneration(config)
    image_processor = Cosmos3EdgeImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                                   patch_size=8, merge_size=2, temporal_patch_size=1)
    processor = image_only(Cosmos3EdgeProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    processor.return_mm_token_type_ids = True  # as Qwen3-VL's processor does: generate needs them for M-RoPE
    return model, processor


def build_video_llama_3(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """VideoLLaMA 3 on images: a packed SigLIP `vision_model` with 2-D RoPE, an MLP `projector`, Qwen2 (1-D RoPE);
    one placeholder per 2x2-merged patch (`image_merge_sizes` beside the grid). Its checkpoints' ChatML template
    writes each image as <|image_pad|> and a line break, without Qwen2-VL's vision start and end."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration, VideoLlama3Processor
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    tokenizer = chatml_tokenizer(*QWEN_VISION_TOKENS)
    ids = token_ids(tokenizer, (*QWEN_VISION_TOKENS, "<|endoftext|>", "<|im_end|>"))
    config = VideoLlama3Config(
        text_config=dict(model_type="qwen2", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False,
    )
    model = VideoLlama3ForConditionalGeneration(config)
    image_processor = VideoLlama3ImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2)
    processor = image_only(VideoLlama3Processor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chatml_template("<|image_pad|>\n"),
    )
    return model, processor


PADDLE_SPECIALS = ("<unk>", "<|begin_of_sentence|>", "</s>", "<|endoftext|>", "<|IMAGE_START|>", "<|IMAGE_END|>",
                   "<|IMAGE_PLACEHOLDER|>", "<|video_pad|>", "User", "Assistant")
# PaddleOCR-VL's prompt layout (PaddlePaddle/PaddleOCR-VL's chat_template.jinja): BOS, "User: ", the images, then
# the texts, a line break, then "Assistant: ". The line break is a Jinja string literal (trim_blocks).
PADDLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|IMAGE_START|><|IMAGE_PLACEHOLDER|>"
    "<|IMAGE_END|>{% endif %}{% endfor %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% else %}{{ 'Assistant: ' }}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def build_paddleocr_vl(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """PaddleOCR-VL: a packed SigLIP `visual` tower, a 2x2-merging `projector`, ERNIE 4.5 with M-RoPE; each
    image is wrapped in <|IMAGE_START|> ... <|IMAGE_END|>."""
    from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration, PaddleOCRVLProcessor
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(PADDLE_SPECIALS, WORDS), bos_token="<|begin_of_sentence|>", eos_token="</s>",
        unk_token="<unk>", pad_token="<|endoftext|>", padding_side="left",
    )
    ids = token_ids(tokenizer, PADDLE_SPECIALS)
    tokenizer.image_token, tokenizer.image_token_id = "<|IMAGE_PLACEHOLDER|>", ids["<|IMAGE_PLACEHOLDER|>"]
    half = shape.head_dim // 2
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["</s>"],
                      bos_token_id=ids["<|begin_of_sentence|>"],
                      initializer_range=0.2,  # with the default scale every step picks the same token
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]})
    config = PaddleOCRVLConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, spatial_merge_size=2),
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|IMAGE_START|>"], vision_end_token_id=ids["<|IMAGE_END|>"],
        tie_word_embeddings=False,  # tied random embeddings make every step pick the same token
    )
    model = PaddleOCRVLForConditionalGeneration(config)
    image_processor = PaddleOCRVLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8,
                                                   merge_size=2)
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=PADDLE_TEMPLATE)
    return model, processor


GRANITE_SPECIALS = ("<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<unk>",
                    "<fake_token_around_image>", "<image>", "<global-img>", "<row_1_col_1>", "user", "assistant")
GRANITE_TEMPLATE = (
    "{% for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|end_of_text|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)


def build_granite_docling(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Granite-Docling: Idefics3's layout (`vision_model`, `text_model`, images wrapped in
    <fake_token_around_image><global-img> ... <fake_token_around_image>) with a coarse pixel-shuffle connector
    inside the vision model (DeepStack mergers from vision layer 0; a 64-pixel image gives 4 tokens) and a
    Granite language model (embedding, residual, attention and logit multipliers)."""
    from transformers import GraniteDoclingConfig, GraniteDoclingForConditionalGeneration, GraniteDoclingProcessor
    from transformers.models.granite_docling.image_processing_pil_granite_docling import (
        GraniteDoclingImageProcessorPil,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(GRANITE_SPECIALS, WORDS), eos_token="<|end_of_text|>", unk_token="<unk>",
        pad_token="<|pad|>", padding_side="left",
    )
    ids = token_ids(tokenizer, GRANITE_SPECIALS)
    text = shape.text(len(tokenizer), pad_token_id=ids["<|pad|>"], eos_token_id=ids["<|end_of_text|>"],
                      bos_token_id=ids["<|end_of_text|>"], embedding_multiplier=4.0, logits_scaling=1.0,
                      residual_multiplier=0.5, attention_multiplier=1.0 / shape.head_dim, tie_word_embeddings=False,
                      initializer_range=0.2)  # with the default scale every row picks the same tokens
    config = GraniteDoclingConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8, out_hidden_size=shape.hidden, scale_factor=4,
                           deepstack_visual_indexes=[0], use_fine_route=False),
        image_token_id=ids["<image>"], pad_token_id=ids["<|pad|>"], tie_word_embeddings=False,
    )
    model = GraniteDoclingForConditionalGeneration(config)
    image_processor = GraniteDoclingImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=False)
    processor = GraniteDoclingProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                        chat_template=GRANITE_TEMPLATE)
    return model, processor


HUNYUAN_SPECIALS = ("<｜hy_place▁holder▁no▁0｜>", "<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>",
                    "<｜hy_place▁holder▁no▁2｜>", "<unk>", "<｜hy_place▁holder▁no▁3｜>", "<｜hy_place▁holder▁no▁100｜>",
                    "<｜hy_place▁holder▁no▁101｜>", "<｜hy_place▁holder▁no▁102｜>", "<｜hy_place▁holder▁no▁103｜>")
HUNYUAN_PAD, HUNYUAN_BOS, HUNYUAN_USER, HUNYUAN_ASSISTANT, HUNYUAN_EOS = HUNYUAN_SPECIALS[:5]
# HunyuanOCR's own ids: the system text ends at no. 3; an image is no. 100 (start), no. 102 (the placeholder the
# processor repeats) and no. 101 (end); no. 103 is the row break (config im_newline_id)
HUNYUAN_SYSTEM_END, HUNYUAN_IMAGE_START, HUNYUAN_IMAGE_END, HUNYUAN_IMAGE, HUNYUAN_NEWLINE = HUNYUAN_SPECIALS[6:]
# HunyuanOCR's prompt layout: the user's images and text come first and <｜hy_User｜> closes them; the generation
# prompt ends there
HUNYUAN_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}" + HUNYUAN_SYSTEM_END + "{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    + HUNYUAN_SYSTEM_END + "{% elif message['role'] == 'user' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + HUNYUAN_IMAGE_START + HUNYUAN_IMAGE +
    HUNYUAN_IMAGE_END + "{% else %}{{ item['text'] }}{% endif %}{% endfor %}" + HUNYUAN_USER + "{% else %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}" + HUNYUAN_ASSISTANT + "{% endif %}"
    "{% endfor %}"
)


def build_hunyuan_vl(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """HunYuanVL (HunyuanOCR): a packed SigLIP-style `vision_tower` whose convolutional merger adds a newline
    feature after each row and begin/end features around the image (all image placeholders: 2x(2+1)+2 = 8 tokens
    for a 32-pixel image), a HunYuan dense language model with 4-axis M-RoPE (position, width, height, image index)."""
    from transformers import HunYuanVLConfig, HunYuanVLForConditionalGeneration, HunYuanVLProcessor
    from transformers.models.hunyuan_vl.image_processing_pil_hunyuan_vl import HunYuanVLImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(HUNYUAN_SPECIALS, WORDS), bos_token=HUNYUAN_BOS, eos_token=HUNYUAN_EOS,
        unk_token="<unk>", pad_token=HUNYUAN_PAD, padding_side="left",
    )
    ids = token_ids(tokenizer, HUNYUAN_SPECIALS)
    for name, token in (("image", HUNYUAN_IMAGE), ("image_start", HUNYUAN_IMAGE_START),
                        ("image_end", HUNYUAN_IMAGE_END)):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    quarter = shape.head_dim // 8  # four sections of half a head
    text = shape.text(len(tokenizer), pad_token_id=ids[HUNYUAN_PAD], eos_token_id=ids[HUNYUAN_EOS],
                      bos_token_id=ids[HUNYUAN_BOS], tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [quarter] * 4})
    config = HunYuanVLConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, spatial_merge_size=2, max_image_size=64, min_image_size=32,
                           out_hidden_size=shape.hidden),
        image_token_id=ids[HUNYUAN_IMAGE], im_start_id=ids[HUNYUAN_IMAGE_START], im_end_id=ids[HUNYUAN_IMAGE_END],
        im_newline_id=ids[HUNYUAN_NEWLINE], tie_word_embeddings=False,
    )
    model = HunYuanVLForConditionalGeneration(config)
    image_processor = HunYuanVLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                                 patch_size=8, merge_size=2)
    processor = HunYuanVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=HUNYUAN_TEMPLATE)
    return model, processor


OVIS_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")


def build_ovis2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Ovis2: an AIMv2-style vision tower whose head gives each patch a distribution over a visual vocabulary,
    embedded by a visual embedding table (no projector); Qwen2. Each image is <IMG_START>, 16 <IMG_ATOM>
    placeholders, <IMG_GRID> ... <IMG_END>, the indicators embedded from the same table."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    tokenizer = chatml_tokenizer("<image>", "<IMG_ATOM>", *OVIS_INDICATORS)
    ids = token_ids(tokenizer, ("<IMG_ATOM>", *OVIS_INDICATORS, "<|endoftext|>", "<|im_end|>"))
    config = Ovis2Config(
        text_config=dict(model_type="qwen2", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, vocab_size=64, hidden_stride=1),
        image_token_id=ids["<IMG_ATOM>"], visual_indicator_token_ids=[ids[t] for t in OVIS_INDICATORS],
        vocab_size=len(tokenizer), hidden_size=shape.hidden, tie_word_embeddings=False,
    )
    model = Ovis2ForConditionalGeneration(config)
    image_processor = Ovis2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    processor = Ovis2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
                               chat_template=chatml_template("<image>\n"))
    return model, processor


# the processor's named tokens; transformers 5.25's processor counts a shared image and video token as both, so the
# video placeholder is a token of its own (the config's default ids are Qwen's <|image_pad|> and <|video_pad|>)
OVIS2_5_TOKENS = {"image_token": "<ovis_visual_atom>", "video_token": "<|video_pad|>",
                  "image_start_token": "<ovis_image_start>", "image_end_token": "<ovis_image_end>",
                  "video_start_token": "<ovis_video_start>", "video_end_token": "<ovis_video_end>"}
# Ovis2.5's chat template (the AIDC-AI/Ovis2.5-9B checkpoint's, which transformers' converter keeps): ChatML, a user
# turn's items joined by line breaks, an image item written as its placeholder, and after the assistant header an
# empty think block when `enable_thinking` is false. The checkpoint writes "<image>"; the native processor expands
# its tokenizer's image token (<ovis_visual_atom>), so the tiny build writes that (how a converted checkpoint's
# template spells it is unverified).
OVIS2_5_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<ovis_visual_atom>{% else %}{{ item['text'] }}{% endif %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_ovis2_5(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Ovis2.5: a SigLIP2-NaViT-style vision tower (learned and 2-D rotary positions, windowed and full layers) on
    Qwen2-VL-style patch grids, a visual tokenizer that turns each 2x2 merge into a distribution over a visual
    vocabulary embedded by a visual embedding table (`multi_modal_projector`), Qwen3. Each image is
    <ovis_image_start>, one <ovis_visual_atom> per merge, <ovis_image_end>; the start and end tokens take learned
    indicator embeddings from the same table."""
    from transformers import Ovis2_5Config, Ovis2_5ForConditionalGeneration, Ovis2_5Processor
    from transformers.models.ovis2_5.image_processing_pil_ovis2_5 import Ovis2_5ImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer((*CHATML_SPECIALS, *OVIS2_5_TOKENS.values()), WORDS),
        eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens=OVIS2_5_TOKENS,
    )
    ids = token_ids(tokenizer, (*OVIS2_5_TOKENS.values(), "<|endoftext|>", "<|im_end|>"))
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=32, window_size=32, vocab_size=64, max_position_embeddings=16,
                  layer_types=["window_attention", "full_attention"])
    config = Ovis2_5Config(
        text_config=dict(model_type="qwen3", **text), vision_config=vision,
        **{f"{name}_id": ids[token] for name, token in OVIS2_5_TOKENS.items()}, tie_word_embeddings=False,
    )
    model = Ovis2_5ForConditionalGeneration(config)
    image_processor = Ovis2_5ImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                               patch_size=8, merge_size=2)
    processor = image_only(Ovis2_5Processor)(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=OVIS2_5_TEMPLATE)
    return model, processor


# Qianfan-OCR's chat template as transformers' conversion script writes it into the checkpoint
# (src/transformers/models/qianfan_ocr/convert_qianfan_ocr_weights_to_hf.py, `multimodal_chat_template`): ChatML with
# a default system message when the conversation has none, each image item written as a placeholder and a line
# break before the text; `enable_thinking=True` (Layout-as-Thought, off by default) adds "\n<think>" at the end of
# the last user turn and "<think>\n" after the assistant header. The script writes "<IMG_CONTEXT>\n" for an image;
# transformers 5.25's processor expands its `image_placeholder_token` (default "<image>") to the same
# <img><IMG_CONTEXT>...</img> ids, so the tiny build writes "<image>\n".
QIANFAN_SYSTEM = "你是千帆VL，由百度智能云研发的多模态大语言模型。"
QIANFAN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QIANFAN_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qianfan_ocr(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qianfan-OCR: InternVL's layout (InternViT, pixel-shuffle projector: 4 tokens per 32-pixel image, each
    image as <img> <IMG_CONTEXT>... </img>) with Qwen3; its checkpoint's template (`QIANFAN_TEMPLATE`: a default
    system message, the image and a line break before the question)."""
    from transformers import QianfanOCRConfig, QianfanOCRForConditionalGeneration, QianfanOCRProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = chatml_tokenizer("<image>", *INTERNVL_TOKENS)
    ids = token_ids(tokenizer, (*INTERNVL_TOKENS, "<|endoftext|>", "<|im_end|>"))
    for name, token in (("start_image", "<img>"), ("end_image", "</img>"), ("context_image", "<IMG_CONTEXT>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    config = QianfanOCRConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=[32, 32], patch_size=[8, 8], drop_path_rate=0.0),
        text_config=dict(model_type="qwen3", **shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                                                           eos_token_id=ids["<|im_end|>"])),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    model = QianfanOCRForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    processor = QianfanOCRProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                    chat_template=QIANFAN_TEMPLATE)
    return model, processor


GEMMA4_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
                   "<|audio>", "<audio|>", "<|audio|>", "<|video|>", "user", "model")
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|image|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def gemma4_tokenizer() -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """Gemma 4's tokenizer (word-level, its special tokens named as its processor reads them) and their ids."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(GEMMA4_SPECIALS, WORDS), bos_token="<bos>", eos_token="<turn|>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
    )
    ids = token_ids(tokenizer, GEMMA4_SPECIALS)
    for name, token in (("boi", "<|image>"), ("eoi", "<image|>"), ("image", "<|image|>"), ("boa", "<|audio>"),
                        ("eoa", "<audio|>"), ("audio", "<|audio|>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    return tokenizer, ids


def gemma4_layer_types(layers: int) -> tuple[list[str], int]:
    """Alternating sliding / full layers ending in a full one, and how many of the last layers share keys and
    values (the first half computes them, the second half reuses them)."""
    layer_types = (["sliding_attention", "full_attention"] * layers)[:layers]
    layer_types[-1] = "full_attention"
    return layer_types, layers - max(layers // 2, 2)


def gemma4_token_ids(ids: dict[str, int]) -> dict[str, Any]:
    """The image, video and audio token ids of a Gemma 4 config."""
    return dict(boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], image_token_id=ids["<|image|>"],
                video_token_id=ids["<|video|>"], boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"],
                audio_token_id=ids["<|audio|>"])


def build_gemma4(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Gemma 4: per-layer embeddings (8 wide), sliding and global layers (the global ones with twice the head
    width, one KV head, keys reused as values), MoE blocks, the last two layers reading the keys and values of the
    last earlier layer of their type (shared KV),
    and bidirectional attention inside each image block (mm_token_type_ids). The image processor's smallest
    budget (70 soft tokens, 3x3 pooling of 4-pixel patches) gives 64 image tokens per image."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tokenizer, ids = gemma4_tokenizer()
    layer_types, shared = gemma4_layer_types(shape.layers)
    text = shape.text(len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["<turn|>"], bos_token_id=ids["<bos>"],
                      global_head_dim=2 * shape.head_dim, sliding_window=16, layer_types=layer_types,
                      num_kv_shared_layers=shared, vocab_size_per_layer_input=len(tokenizer),
                      hidden_size_per_layer_input=8, use_bidirectional_attention="vision",
                      # the 26B-A4B's variants: global layers reuse their keys as values, with one KV head; MoE blocks
                      attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                      top_k_experts=2, moe_intermediate_size=shape.hidden)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=256)
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, **gemma4_token_ids(ids))
    model = Gemma4ForConditionalGeneration(config)
    image_processor = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = image_only(Gemma4Processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        video_processor=None, chat_template=GEMMA4_TEMPLATE, image_seq_length=70,
    )
    return model, processor


OMNI_TOKENS = ("<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|audio_bos|>",
               "<|audio_eos|>")


def build_qwen2_5_omni_thinker(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2.5-Omni's thinker: Qwen2.5-VL's windowed vision tower and M-RoPE language model, with an audio tower
    beside them (built, one layer; the tests give it no audio). Each image is <|vision_bos|> <|IMAGE|>...
    <|vision_eos|>."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    tokenizer = chatml_tokenizer(*OMNI_TOKENS)
    ids = token_ids(tokenizer, (*OMNI_TOKENS, "<|endoftext|>", "<|im_end|>"))
    for name, token in (("image", "<|IMAGE|>"), ("video", "<|VIDEO|>"), ("audio", "<|AUDIO|>"),
                        ("vision_bos", "<|vision_bos|>"), ("vision_eos", "<|vision_eos|>"),
                        ("audio_bos", "<|audio_bos|>"), ("audio_eos", "<|audio_eos|>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    half = shape.head_dim // 2
    text = shape.text(
        len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=shape.hidden, fullatt_block_indexes=[1], window_size=32)
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=shape.hidden, n_window=4, max_source_positions=32)
    # not declared fields of the thinker's config, but its checkpoint's config carries them and M-RoPE reads them
    frames: dict[str, Any] = dict(vision_start_token_id=ids["<|vision_bos|>"],
                                  vision_end_token_id=ids["<|vision_eos|>"])
    config = Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], audio_token_index=ids["<|AUDIO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"], **frames,
    )
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    image_processor = small_qwen_image_processor()
    processor = image_only(Qwen2_5OmniProcessor)(
        image_processor=image_processor, feature_extractor=WhisperFeatureExtractor(feature_size=16),
        tokenizer=tokenizer, chat_template=chatml_template("<|vision_bos|><|IMAGE|><|vision_eos|>"),
    )
    return model, processor


ERNIE_VIDEO_TOKENS = ("<|VIDEO_START|>", "<|VIDEO_END|>", "<|VIDEO_PLACEHOLDER|>")
# ERNIE 4.5 VL's prompt layout (its transformers conversion's template): "User: ", each image numbered
# "Picture <n>:" before it, then "\nAssistant: " and, with thinking off (the default), an empty think block. The
# line breaks are Jinja string literals: a line break right after a block tag is dropped (trim_blocks).
ERNIE_TEMPLATE = (
    "{{ bos_token }}{% set pictures = namespace(n=0) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{% set pictures.n = pictures.n + 1 %}Picture {{ pictures.n }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% else %}{{ '\\nAssistant: ' }}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant: <think>\\n\\n</think>\\n\\n' }}{% endif %}"
)


def build_ernie4_5_vl_moe(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """ERNIE 4.5 VL MoE: a Qwen2-VL-style vision tower and resampler, 3-D RoPE (equal height and width sections),
    modality-routed MoE layers after the first (image tokens and their frames go to vision experts,
    moe_mm_token_type_ids). ERNIE 4.5's prompt layout ("User: ... Assistant: "), each image
    <|IMAGE_START|> <|IMAGE_PLACEHOLDER|>... <|IMAGE_END|>."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration, Ernie4_5_VLMoeProcessor
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    specials = (*PADDLE_SPECIALS, *ERNIE_VIDEO_TOKENS, "<think>", "</think>")  # ERNIE 4.5's own tokens
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(specials, WORDS), bos_token="<|begin_of_sentence|>", eos_token="</s>",
        unk_token="<unk>", pad_token="<|endoftext|>", padding_side="left",
    )
    ids = token_ids(tokenizer, specials)
    names = ("image_start", "image_end", "image", "video_start", "video_end", "video")
    for name, token in zip(names, ("<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>", *ERNIE_VIDEO_TOKENS)):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", ids[token])
    half = shape.head_dim // 2  # the rotary sections (height, width, time) split half a head
    text = shape.text(
        len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["</s>"],
        bos_token_id=ids["<|begin_of_sentence|>"], moe_intermediate_size=[2 * shape.hidden, shape.hidden], moe_k=2,
        moe_num_experts=4, moe_num_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [(half - half // 4) // 2, (half - half // 4) // 2, half // 4]},
    )
    text.pop("head_dim")  # hidden_size // heads
    config = Ernie4_5_VLMoeConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8,
                           spatial_merge_size=2, temporal_merge_size=2),
        image_start_token_id=ids["<|IMAGE_START|>"], image_end_token_id=ids["<|IMAGE_END|>"],
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"], video_start_token_id=ids["<|VIDEO_START|>"],
        video_end_token_id=ids["<|VIDEO_END|>"], video_token_id=ids["<|VIDEO_PLACEHOLDER|>"],
        tie_word_embeddings=False,  # tied random embeddings repeat one token
    )
    model = Ernie4_5_VLMoeForConditionalGeneration(config)
    image_processor = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                                      patch_size=8, merge_size=2)
    processor = image_only(Ernie4_5_VLMoeProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                    chat_template=ERNIE_TEMPLATE)
    return model, processor


def build_aria(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Aria: an Idefics3 vision tower, a projector whose learned queries cross-attend the patches (4 queries for
    the 100 patches of a 490-pixel image: the image processor accepts 490 or 980 only, so the patches are 49
    pixels), an MoE language model with a shared expert."""
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaProcessor
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    class TinyAriaProcessor(AriaProcessor):
        images_kwargs = cast(Any, {"max_image_size": 490, "split_image": False})  # the stock default: 980

    tokenizer = chatml_tokenizer("<|img|>")
    ids = token_ids(tokenizer, ("<|img|>", "<|endoftext|>", "<|im_end|>"))
    tokenizer.image_token, tokenizer.image_token_id = "<|img|>", ids["<|img|>"]
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=None, moe_intermediate_size=2 * shape.hidden, moe_num_experts=4, moe_topk=2,
                      moe_num_shared_experts=1)
    config = AriaConfig(
        vision_config=dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=490, patch_size=49),
        text_config=text, projector_patch_to_query_dict={100: 4}, image_token_index=ids["<|img|>"],
    )
    model = AriaForConditionalGeneration(config)
    image_processor = AriaImageProcessorPil(max_image_size=490, min_image_size=49)
    processor = TinyAriaProcessor(image_processor=image_processor, tokenizer=cast(Any, tokenizer),
                                  chat_template=chatml_template("<|img|>\n"), size_conversion={490: 4})
    return model, processor


def build_deepseek_vl_hybrid(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """DeepSeek-VL hybrid: DeepSeek-VL's SigLIP tower (16 tokens per 32-pixel image) beside a SAM tower on a
    64-pixel copy (high_res_pixel_values), both read by the `aligner`, Llama."""
    from transformers import (
        DeepseekVLHybridConfig,
        DeepseekVLHybridForConditionalGeneration,
        DeepseekVLHybridProcessor,
    )
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    tokenizer, ids, text = deepseek_text(shape)
    sam = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
               num_attention_heads=4, mlp_dim=64, image_size=64, patch_size=16, global_attn_indexes=[1],
               window_size=2, initializer_range=SAM_INIT)
    config = DeepseekVLHybridConfig(vision_config=siglip_config(), high_res_vision_config=sam,
                                    text_config=dict(model_type="llama", **text),
                                    image_token_id=ids["<image_placeholder>"], tie_word_embeddings=False)
    model = DeepseekVLHybridForConditionalGeneration(config)
    image_processor = DeepseekVLHybridImageProcessorPil(size={"height": 32, "width": 32},
                                                        high_res_size={"height": 64, "width": 64})
    processor = DeepseekVLHybridProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
                                          chat_template=DEEPSEEK_TEMPLATE)
    return model, processor


def build_hyperclovax_vision_v2(shape: Shape) -> tuple[PreTrainedModel, ProcessorMixin]:
    """HyperCLOVA X Vision V2: Qwen2.5-VL's vision tower (`vision_model`) and prompt layout, a linear
    `projector`, a HyperCLOVA X language model (post-norm layers, 1-D RoPE); VideoLLaMA 3's model class."""
    from transformers import (
        HyperCLOVAXVisionV2Config,
        HyperCLOVAXVisionV2ForConditionalGeneration,
        HyperCLOVAXVisionV2Processor,
    )

    tokenizer = chatml_tokenizer(*QWEN_VISION_TOKENS)
    ids = token_ids(tokenizer, (*QWEN_VISION_TOKENS, "<|endoftext|>", "<|im_end|>"))
    text = shape.text(len(tokenizer), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=None, tie_word_embeddings=False,
                      initializer_range=0.2)  # with the default scale every step picks the same token
    vision = dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=shape.hidden,
                  window_size=32, fullatt_block_indexes=[1])
    config = HyperCLOVAXVisionV2Config(text_config=dict(model_type="hyperclovax", **text), vision_config=vision,
                                       image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                       tie_word_embeddings=False)
    model = HyperCLOVAXVisionV2ForConditionalGeneration(config)
    image_processor = small_qwen_image_processor()
    processor = image_only(HyperCLOVAXVisionV2Processor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return model, processor


# families whose processor takes one list of images per prompt
NESTED_IMAGES = frozenset({"gemma3", "gemma4", "idefics2", "idefics3", "smolvlm"})

BUILDERS: dict[str, Builder] = {
    "hyperclovax_vision_v2": build_hyperclovax_vision_v2,
    "deepseek_vl_hybrid": build_deepseek_vl_hybrid,
    "aria": build_aria,
    "ernie4_5_vl_moe": build_ernie4_5_vl_moe,
    "qwen2_5_omni_thinker": build_qwen2_5_omni_thinker,
    "gemma4": build_gemma4,
    "qianfan_ocr": build_qianfan_ocr,
    "ovis2": build_ovis2,
    "ovis2_5": build_ovis2_5,
    "hunyuan_vl": build_hunyuan_vl,
    "granite_docling": build_granite_docling,
    "paddleocr_vl": build_paddleocr_vl,
    "video_llama_3": build_video_llama_3,
    "cosmos3_edge": build_cosmos3_edge,
    "cohere_compass": build_cohere_compass,
    "got_ocr2": build_got_ocr2,
    "glm_ocr": build_glm_ocr,
    "video_llava": build_video_llava,
    "llava_next_video": build_llava_next_video,
    "cohere2_vision": build_cohere2_vision,
    "deepseek_vl": build_deepseek_vl,
    "deepseek_ocr2": build_deepseek_ocr2,
    "idefics2": build_idefics2,
    "exaone4_5": build_exaone4_5,
    "llava_onevision1_5": build_llava_onevision1_5,
    "lighton_ocr": build_lighton_ocr,
    "vipllava": build_vipllava,
    "mistral3": build_mistral3,
    "paligemma": build_paligemma,
    "glm4v": build_glm4v,
    "glm4v_moe": build_glm4v_moe,
    "glm46v": build_glm46v,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "aya_vision": build_aya_vision,
    "internvl": build_internvl,
    "gemma3": build_gemma3,
    "llava_onevision": build_llava_onevision,
    "qwen3_vl": build_qwen3_vl,
    "qwen3_vl_moe": build_qwen3_vl_moe,
}

