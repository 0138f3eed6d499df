"""The instruction span ends where the real chat templates start the assistant's turn, under the real
tokenizers' way of spelling the marker, and the tiny builds write the prompts their checkpoints' templates write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaTokenizer

from vlmfix.adapters import SUPPORTED_CLASSES, get_adapter
from vlmfix.testing import random_image
from vlmfix.testing.tiny_families import ERNIE_TEMPLATE

from .conftest import tiny_model

ERNIE_SPECIALS = ("<unk>", "<|begin_of_sentence|>", "</s>", "<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>",
                  "<|IMAGE_END|>", "<think>", "</think>")
# whole-word pieces of a SentencePiece vocabulary: a word starts with the space marker "▁" or, after a line
# break or a special token, without it (no piece holds a line break: SentencePiece trains on single lines)
ERNIE_PIECES = ("User", "▁User", "Picture", "▁Picture", "Assistant", "▁Assistant", "Is", "▁Is", "▁there", "▁a",
                "▁dog")


def sentencepiece_bpe(add_prefix_space: bool) -> LlamaTokenizer:
    """A small BPE tokenizer built as transformers' ERNIE 4.5 VL conversion builds the real one (LlamaTokenizer,
    legacy, `add_prefix_space=False`: no dummy prefix), or with SentencePiece's dummy prefix."""
    vocab = {token: i for i, token in enumerate(ERNIE_SPECIALS)}
    for char in sorted(set("".join(ERNIE_PIECES)) | set("\n:?1 ")):
        vocab.setdefault(char, len(vocab))
    merges = []
    for piece in ERNIE_PIECES:  # each piece grows one character at a time from pieces already in the vocabulary
        for n in range(2, len(piece) + 1):
            if piece[:n] not in vocab:
                vocab[piece[:n]] = len(vocab)
                merges.append((piece[: n - 1], piece[n - 1]))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=add_prefix_space, legacy=True,
                               unk_token="<unk>", bos_token="<|begin_of_sentence|>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(ERNIE_SPECIALS[3:])})
    tokenizer.chat_template = ERNIE_TEMPLATE
    return tokenizer


class ConfigOnly(nn.Module):
    """A model that is only its config's token ids (the adapter reads nothing else to find spans)."""

    def __init__(self, **token_ids: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(**token_ids)


@pytest.mark.parametrize("add_prefix_space", [False, True], ids=["as-converted", "dummy-prefix"])
def test_ernie_instruction_ends_at_assistant_under_a_sentencepiece_tokenizer(add_prefix_space):
    tokenizer = sentencepiece_bpe(add_prefix_space)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Is there a dog?\nAssistant: <think>\n\n</think>\n\n" in text  # the conversion template's ending
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    if add_prefix_space:  # the marker alone or after a space is spelled "▁Assistant": not what the prompt holds
        for alone in ("Assistant:", " Assistant:"):
            needle = tokenizer.encode(alone, add_special_tokens=False)
            row = ids[0].tolist()
            assert not any(row[i : i + len(needle)] == needle for i in range(len(row)))

    # reference: from the token after <|IMAGE_END|> to the first token that starts at "Assistant:"'s first character
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ERNIE_SPECIALS}
    start = encoded["input_ids"].index(token_ids["<|IMAGE_END|>"]) + 1
    assistant_at = text.index("\nAssistant:") + 1
    end = next(i for i, (first, _) in enumerate(encoded["offset_mapping"]) if first >= assistant_at)
    expected = torch.zeros_like(ids, dtype=torch.bool)
    expected[0, start:end] = True

    model = ConfigOnly(image_token_id=token_ids["<|IMAGE_PLACEHOLDER|>"],
                       image_start_token_id=token_ids["<|IMAGE_START|>"], image_end_token_id=token_ids["<|IMAGE_END|>"])
    adapter = SUPPORTED_CLASSES["Ernie4_5_VLMoeForConditionalGeneration"](model)
    spans = adapter.spans(ids, torch.ones_like(ids), tokenizer)
    assert torch.equal(spans.instruction, expected), tokenizer.convert_ids_to_tokens(ids[spans.instruction])
    assert tokenizer.decode(ids[expected]).strip() == "Is there a dog?"


DEEPSEEK_VL_PROMPT = ("<｜begin▁of▁sentence｜>You are a helpful language and vision assistant. You are able to "
                      "understand the visual content that the user provides, and assist the user with a variety of "
                      "tasks using natural language.\n\nUser: <image_placeholder>{q}\n\nAssistant:")
# DeepSeek-OCR's plain prompt: no roles, no assistant turn
DEEPSEEK_OCR_PROMPT = "<｜begin▁of▁sentence｜><image>\n{q}"

# what the checkpoints' own templates write for one image and a question (VideoLLaMA 3: lkhl/VideoLLaMA3-2B-Image-HF's
# chat_template.jinja; LightOnOCR: lightonai/LightOnOCR-1B-1025's; ERNIE 4.5 VL: transformers' conversion script;
# DeepSeek-VL and its hybrid: the template of transformers' processor tests for both, after the BOS their tokenizer
# adds; DeepSeek-OCR-2 and Unlimited OCR: the official inference code's "plain" format after BOS; PaddleOCR-VL:
# PaddlePaddle/PaddleOCR-VL's chat_template.jinja; Qianfan-OCR: the template transformers' conversion script writes,
# whose image placeholder the processor expands; Dots3 Note: dots.ocr's template, its own being unverified; Ovis2.5:
# AIDC-AI/Ovis2.5-9B's chat_template.json, with the processor's <ovis_visual_atom> where the checkpoint writes <image>;
# LLaVA-OneVision-1.5: the prompt ids and decoded prompts of transformers' integration tests of
# Deep-VLM/LLaVA-OneVision-1.5-4B-Instruct-hf)
CHECKPOINT_PROMPTS = {
    "deepseek_vl": DEEPSEEK_VL_PROMPT,
    "deepseek_vl_hybrid": DEEPSEEK_VL_PROMPT,
    "deepseek_ocr2": DEEPSEEK_OCR_PROMPT,
    "unlimited_ocr": DEEPSEEK_OCR_PROMPT,
    "paddleocr_vl": "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{q}\nAssistant: ",
    "video_llama_3": "<|im_start|>user\n<|image_pad|>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "lighton_ocr": "<|im_start|>system<|im_end|>\n<|im_start|>user\n<|image_pad|>{q}\n<|im_end|>\n"
                   "<|im_start|>assistant\n",
    "ernie4_5_vl_moe": "<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{q}"
                       "\nAssistant: <think>\n\n</think>\n\n",
    "qianfan_ocr": "<|im_start|>system\n你是千帆VL，由百度智能云研发的多模态大语言模型。<|im_end|>\n"
                   "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "dots3_note": "<|user|><|img|><|imgpad|><|endofimg|>{q}<|endofuser|><|assistant|>",
    "ovis2_5": "<|im_start|>user\n<ovis_visual_atom>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "llava_onevision1_5": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                          "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("family", list(CHECKPOINT_PROMPTS))
def test_the_tiny_prompt_is_the_checkpoints_layout_and_its_instruction_the_question(family):
    tiny = tiny_model(family, layers=1)
    question = "is there a dog ?"
    assert tiny.prompt(question, True, 1) == CHECKPOINT_PROMPTS[family].format(q=question)
    inputs = tiny.inputs([question])
    ids = inputs["input_ids"]
    spans = get_adapter(tiny.model).spans(ids, inputs["attention_mask"], tiny.tokenizer)
    assert ids[spans.instruction].tolist() == tiny.tokenizer.encode(question, add_special_tokens=False)


def test_video_llama_3_names_no_frame_token():
    """Its template writes no vision start or end around an image (Qwen2-VL's tokenizer still has them)."""
    adapter = get_adapter(tiny_model("video_llama_3", layers=1).model)
    assert adapter.frame_tokens == () and adapter.frame_token_ids == ()


def test_dots3_note_instruction_also_ends_at_a_chatml_turn_end():
    """Its checkpoint's template is unverified: a ChatML prompt (its tokenizer holds <|im_end|>) ends the instruction
    at <|im_end|> as dots.ocr's layout ends it at <|endofuser|>."""
    tiny = tiny_model("dots3_note", layers=1)
    question = "is there a dog ?"
    chatml = f"<|im_start|>user\n<|img|><|imgpad|><|endofimg|>{question}<|im_end|>\n<|im_start|>assistant\n"
    inputs = tiny.processor(text=[chatml], images=[random_image(48, 0)], return_tensors="pt")
    ids = inputs["input_ids"]
    spans = get_adapter(tiny.model).spans(ids, inputs["attention_mask"], tiny.tokenizer)
    assert ids[spans.instruction].tolist() == tiny.tokenizer.encode(question, add_special_tokens=False)
