"""Families that follow the common layout (`vlmfix.adapters.base`): one line each.

A line names the family, its model classes and the text that ends the user's turn in its chat template
(the instruction span stops there). Everything else (decoder layers, heads, image and frame tokens,
projector, vision tower, M-RoPE, cached `rope_deltas`) is found on the model. A family that differs
gets a module of its own (`llava.py`, `qwen2_vl.py`, ...) holding its module tree and its overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmfix.adapters.base import Adapter
from vlmfix.adapters.qwen2_vl import CHATML, ChatMLAdapter


def common_layout(family: str, *model_classes: str, markers: tuple[str, ...],
                  frames: tuple[str, ...] = ()) -> type[Adapter]:
    """An adapter class for a family that follows the common layout (`frames`: image-wrapping tokens that
    the config does not name). A family whose turns end with ChatML's <|im_end|> has a ChatML system message,
    which ICD's system placement fills as Qwen2-VL's (`chatml_system_splice`: the message's text replaced, or the
    message added when the prompt has none), rather than writing its text before the first turn: its class builds
    on `ChatMLAdapter`."""
    name = "".join(part.title() for part in family.split("_")) + "Adapter"
    namespace: dict[str, Any] = {
        "family": family, "model_classes": model_classes, "assistant_markers": markers, "frame_tokens": frames,
        "__module__": __name__, "__doc__": f"{family}: the common layout ({', '.join(model_classes)}).",
    }
    base = ChatMLAdapter if markers == CHATML else Adapter
    return dataclass(frozen=True)(type(name, (base,), namespace))


COMMON_LAYOUT: tuple[type[Adapter], ...] = (
    common_layout("aria", "AriaForConditionalGeneration", markers=CHATML),
    common_layout("aya_vision", "AyaVisionForConditionalGeneration", markers=("<|END_OF_TURN_TOKEN|>",),
                  frames=("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>")),
    common_layout("cohere2_vision", "Cohere2VisionForConditionalGeneration", markers=("<|END_OF_TURN_TOKEN|>",),
                  frames=("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>")),
    # North Micro Vision: its tokenizer stops on <|END_OF_TURN_TOKEN|>; its chat template itself is unverified
    # (see vlmfix.testing.tiny_families.build_cohere_compass)
    common_layout("cohere_compass", "CohereCompassForConditionalGeneration", markers=("<|END_OF_TURN_TOKEN|>",)),
    # Cosmos3-Edge: eos <|im_end|>; a Nemotron-3-Nano-style ChatML template, read only in part (build_cosmos3_edge)
    common_layout("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration", markers=CHATML),
    common_layout("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", markers=("Assistant:",)),
    # DeepSeek-OCR-2's model card prompts "<image>\nFree OCR." with no turns: the instruction runs to the prompt's end
    common_layout("deepseek_ocr2", "DeepseekOcr2ForConditionalGeneration", markers=("Assistant:",)),
    common_layout("exaone4_5", "Exaone4_5_ForConditionalGeneration", markers=("<|endofturn|>",),
                  frames=("<vision>", "</vision>")),  # <|user|>\n<vision>...</vision>text<|endofturn|>\n<|assistant|>
    common_layout("fast_vlm", "FastVlmForConditionalGeneration", markers=CHATML),
    common_layout("gemma3", "Gemma3ForConditionalGeneration", markers=("<end_of_turn>",)),
    common_layout("gemma4", "Gemma4ForConditionalGeneration", markers=("<turn|>",)),
    common_layout("gemma4_unified", "Gemma4UnifiedForConditionalGeneration", markers=("<turn|>",)),
    common_layout("glm46v", "Glm46VForConditionalGeneration", markers=("<|assistant|>",)),
    common_layout("glm4v", "Glm4vForConditionalGeneration", markers=("<|assistant|>",)),
    common_layout("glm_ocr", "GlmOcrForConditionalGeneration", markers=("<|assistant|>",)),
    common_layout("glm4v_moe", "Glm4vMoeForConditionalGeneration", markers=("<|assistant|>",)),
    common_layout("got_ocr2", "GotOcr2ForConditionalGeneration", markers=CHATML, frames=("<img>", "</img>")),
    common_layout("granite4_vision", "Granite4VisionForConditionalGeneration", markers=("<|end_of_text|>",)),
    common_layout("granite_docling", "GraniteDoclingForConditionalGeneration", markers=("<|end_of_text|>",),
                  frames=("<fake_token_around_image>", "<global-img>")),
    # HunyuanOCR: <｜hy_begin▁of▁sentence｜>[system]<｜hy_place▁holder▁no▁3｜><image>text<｜hy_User｜> (the user's turn
    # ends at <｜hy_User｜>; HunYuan's chat models open it there and end it at <｜hy_Assistant｜>)
    common_layout("hunyuan_vl", "HunYuanVLForConditionalGeneration", markers=("<｜hy_User｜>", "<｜hy_Assistant｜>"),
                  frames=("<｜hy_place▁holder▁no▁100｜>", "<｜hy_place▁holder▁no▁101｜>")),  # image start, end
    common_layout("hyperclovax_vision_v2", "HyperCLOVAXVisionV2ForConditionalGeneration", markers=CHATML,
                  frames=("<|vision_start|>", "<|vision_end|>")),
    common_layout("idefics2", "Idefics2ForConditionalGeneration", markers=("<end_of_utterance>",),
                  frames=("<fake_token_around_image>",)),
    common_layout("idefics3", "Idefics3ForConditionalGeneration", markers=("<end_of_utterance>",),
                  frames=("<fake_token_around_image>", "<global-img>")),
    common_layout("internvl", "InternVLForConditionalGeneration", markers=CHATML, frames=("<img>", "</img>")),
    common_layout("kimi_k25", "Kimi_K25ForConditionalGeneration", markers=CHATML,
                  frames=("<|media_content|>",)),
    common_layout("lighton_ocr", "LightOnOcrForConditionalGeneration", markers=CHATML,
                  frames=("<|vision_pad|>", "<|vision_end|>")),
    # Llama 4: <|header_start|>user<|header_end|>\n\n<|image_start|>[tiles: <|patch|>... <|tile_x_separator|> ...
    # <|tile_y_separator|>]<|image|><|patch|>...<|image_end|>text<|eot|><|header_start|>assistant<|header_end|>\n\n
    common_layout("llama4", "Llama4ForConditionalGeneration", markers=("<|eot|>",),
                  frames=("<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")),
    common_layout("llava_next_video", "LlavaNextVideoForConditionalGeneration", markers=("ASSISTANT:", "[/INST]")),
    common_layout("llava_onevision", "LlavaOnevisionForConditionalGeneration", markers=CHATML),
    # LLaVA-OneVision-1.5: Qwen2-VL's template (default system message; image wrapping by config ids)
    common_layout("llava_onevision1_5", "LlavaOnevision15ForConditionalGeneration", markers=CHATML),
    # MiniMax M3: ]~b]user\n]<]start of image[>[]<]image[>[...]<]end of image[>[text[e~[\n]~b]ai\n (MiniMax M2's turn
    # layout; M3's own template not checked); unpadded batches only (Adapter.left_padding_changes_rows)
    common_layout("minimax_m3_vl", "MiniMaxM3SparseForConditionalGeneration", markers=("[e~[",),
                  frames=("]<]start of image[>[", "]<]end of image[>[")),
    common_layout("mistral_large4", "MistralLarge4ForConditionalGeneration", markers=("[/INST]",),
                  frames=("[IMG_BREAK]", "[IMG_END]")),
    common_layout("mistral3", "Mistral3ForConditionalGeneration", markers=("[/INST]",),
                  frames=("[IMG_BREAK]", "[IMG_END]")),
    common_layout("molmo2", "Molmo2ForConditionalGeneration", markers=CHATML,
                  frames=("<im_col>", "<low_res_im_start>")),  # row ends, the low-resolution view's start
    common_layout("muse_glimmer", "MuseGlimmerForConditionalGeneration", markers=("<|eot|>",),
                  frames=("<|image_start|>", "<|image_end|>")),
    common_layout("muse_spark", "MuseSparkForConditionalGeneration", markers=("<|eot|>",),
                  frames=("<|image_start|>", "<|image_end|>")),
    common_layout("ovis2", "Ovis2ForConditionalGeneration", markers=CHATML),
    # Ovis2.5: <ovis_image_start> <ovis_visual_atom>... <ovis_image_end> (config ids), ChatML (AIDC-AI/Ovis2.5-9B).
    # Its projector is the visual tokenizer and embedding table: DCD's projectors make the atoms' embeddings, while
    # the start / end tokens' indicator embeddings stay the model's (read from its own table, outside the forward)
    common_layout("ovis2_5", "Ovis2_5ForConditionalGeneration", markers=CHATML),
    common_layout("paddleocr_vl", "PaddleOCRVLForConditionalGeneration", markers=("Assistant:",)),
    common_layout("paligemma", "PaliGemmaForConditionalGeneration", markers=("\n",)),
    common_layout("perception_lm", "PerceptionLMForConditionalGeneration", markers=("<|eot_id|>",)),
    # Qianfan-OCR: ChatML with a default system message (transformers' conversion script writes its template)
    common_layout("qianfan_ocr", "QianfanOCRForConditionalGeneration", markers=CHATML, frames=("<img>", "</img>")),
    common_layout("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration", markers=CHATML,
                  frames=("<|vision_bos|>", "<|vision_eos|>")),
    common_layout("qwen3_vl", "Qwen3VLForConditionalGeneration", markers=CHATML),
    common_layout("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", markers=CHATML),
    common_layout("smolvlm", "SmolVLMForConditionalGeneration", markers=("<end_of_utterance>",),
                  frames=("<fake_token_around_image>", "<global-img>")),
    # VideoLLaMA 3's checkpoints write each image as <|image_pad|> and a line break, with no vision start or end
    common_layout("video_llama_3", "VideoLlama3ForConditionalGeneration", markers=CHATML),
    common_layout("video_llava", "VideoLlavaForConditionalGeneration", markers=("ASSISTANT:",)),
    common_layout("unlimited_ocr", "UnlimitedOcrForConditionalGeneration", markers=("Assistant:",)),
    common_layout("vipllava", "VipLlavaForConditionalGeneration", markers=("ASSISTANT:", "###Assistant:")),
)
