"""ICD against plain-PyTorch references: the disturbed prompt (built here from the spec's text), the contrast,
batching, composition and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.prompt_inputs import Splice, splice_rows
from vlmfix.methods.icd import ICD, ICD_PROMPTS, ICDState
from vlmfix.methods.pai import PAI
from vlmfix.testing import random_image

from .conftest import tiny_model
from .reference_decoding import (
    QUESTIONS,
    assert_batch_rows_equal_rows_alone,
    assert_unchanged,
    grown,
    image_positions,
    reference_logits,
    snapshot,
)
from .test_pai import pai_row_edit

DISTURBANCE = ICD_PROMPTS[3]  # "You are a confused objects detector to provide a fuzzy overview ..."
# the fixed system text of DeepSeek-VL's chat template (both variants), which ICD's system placement replaces
DEEPSEEK_SYSTEM_TEXT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
# the default system message of Qianfan-OCR's chat template (transformers' conversion script)
QIANFAN_SYSTEM_TEXT = "你是千帆VL，由百度智能云研发的多模态大语言模型。"
# the system texts that the families' templates always write, which ICD's system placement replaces
FIXED_SYSTEM_TEXTS = {"deepseek_vl": DEEPSEEK_SYSTEM_TEXT, "deepseek_vl_hybrid": DEEPSEEK_SYSTEM_TEXT,
                      "qianfan_ocr": QIANFAN_SYSTEM_TEXT}


class Recording(ICD):
    """ICD that keeps the logits its `combine` receives, per step (the engine's view of both streams)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen: list[tuple[Tensor, Tensor]] = []

    def combine(self, state, positive_logits, negative_logits, step):
        self._seen.append((positive_logits.clone(), negative_logits.clone()))
        return super().combine(state, positive_logits, negative_logits, step)


def disturbed_inputs(tiny, questions: list[str], disturbance: str, placement: str, image_seed: int = 0) -> dict:
    """The disturbed prompts written as text from the spec (§3.1) and run through the processor, with the images
    `tiny.inputs` gives the same rows (other images with another `image_seed`)."""
    prompts = [tiny.prompt(q) for q in questions]
    qwen = tiny.family.startswith("qwen")
    chatml = all(p.startswith("<|im_start|>") for p in prompts)
    deepseek = tiny.family.startswith("deepseek_vl")
    fixed = FIXED_SYSTEM_TEXTS.get(tiny.family)
    if placement == "system" and fixed:  # d in place of the template's system text (DeepSeek: `<bos>d\n\nUser: ...`)
        assert all(fixed in p for p in prompts)
        prompts = [p.replace(fixed, disturbance) for p in prompts]
    elif placement == "system":  # LLaVA: `d USER: <image> ...`; ChatML (Qwen, InternVL): a system message holding d
        prompts = [f"<|im_start|>system\n{disturbance}<|im_end|>\n{p}" if chatml else f"{disturbance} {p}"
                   for p in prompts]
    else:  # `USER: <image> d <question>` (after Qwen's vision end; DeepSeek: a line break before the question)
        image = "<|vision_end|>" if qwen else "<image_placeholder>" if deepseek else "<image>"
        after = f"{image} {disturbance}\n" if deepseek else f"{image} {disturbance}"
        prompts = [p.replace(image, after) for p in prompts]
    images = [random_image(48 + 16 * ((image_seed + i) % 3), image_seed + i) for i in range(len(questions))]
    return dict(tiny.processor(text=prompts, images=images, return_tensors="pt", padding=True))


def contrast_reference(positive: Tensor, negative: Tensor, alpha: float, beta: float | None) -> Tensor:
    """(1 + alpha) l - alpha l_d, -inf where l < log beta + max l (spec §3.2)."""
    scores = (1 + alpha) * positive - alpha * negative
    if beta is not None:
        scores[positive < math.log(beta) + positive.max(-1, keepdim=True).values] = -math.inf
    return scores


def assert_scores_close(got: Tensor, want: Tensor, tol: float = 1e-4) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=tol, rtol=tol)


def plain_next_logits(model, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def run(tiny, inputs, method, steps, *extra, **kw):
    with vlmfix.apply(tiny.model, *extra, method, tokenizer=tiny.processor) as session:
        out = session.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                               return_dict_in_generate=True, output_logits=True, **kw)
    return out, session.report()


# ---------------------------------------------------------------------------------------------
# the rule and the splice on hand-checkable inputs


def test_apc_golden():
    """l = [2, 1, -3], l_d = [1, 2, 0], alpha 1, beta 0.1: [3, 0, -inf] (-3 < ln 0.1 + 2)."""
    positive, negative = torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    state = ICDState([None])
    scores = ICD(alpha=1.0, beta=0.1).combine(state, positive, negative, 0)
    assert torch.equal(scores, torch.tensor([[3.0, 0.0, -math.inf]]))
    assert state.changed_top_token == [0]
    assert torch.equal(positive, torch.tensor([[2.0, 1.0, -3.0]]))  # not modified in place


def test_splice_rows_golden():
    """Row 0 (left-padded) gets 2 tokens inserted at 1; row 1 has tokens [1, 3) replaced by one. Positions:
    unchanged before, consecutive for new tokens, shifted after; M-RoPE sections move together."""
    inputs = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        "mm_token_type_ids": torch.tensor([[0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]),
        # [sections=3, B, S]: row 0's image token sits at grid position (1, 1, 2); row 1's two at (1,1,1),(1,1,2)
        "position_ids": torch.tensor([[[0, 0, 0, 1, 3], [0, 1, 1, 3, 4]],
                                      [[0, 0, 0, 1, 3], [0, 1, 1, 3, 4]],
                                      [[0, 0, 0, 2, 3], [0, 1, 2, 3, 4]]]),
        "logits_to_keep": 1,
    }
    out = splice_rows(inputs, [Splice(1, 1, (40, 41)), Splice(3, 4, (50,))], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 40, 41, 6, 7], [5, 6, 7, 50, 9]]
    assert out["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    assert out["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    # row 0: inserted at 1 -> positions 1, 2; the image token and the rest shift by 2
    # row 1: token 3 (position 3) replaced by one token at position 3; the rest does not move
    assert out["position_ids"].tolist() == [[[0, 1, 2, 3, 5], [0, 1, 1, 3, 4]],
                                            [[0, 1, 2, 3, 5], [0, 1, 1, 3, 4]],
                                            [[0, 1, 2, 4, 5], [0, 1, 2, 3, 4]]]
    assert out["logits_to_keep"] == 1
    after_image = splice_rows(inputs, [None, Splice(3, 3, (60,))], pad_token_id=0)
    # after row 1's image (largest section 2) the next text position is 3, then the old 3, 4 move to 4, 5
    assert after_image["position_ids"][:, 1].tolist() == [[0, 1, 1, 3, 4, 5], [0, 1, 1, 3, 4, 5],
                                                          [0, 1, 2, 3, 4, 5]]
    assert after_image["input_ids"][0].tolist() == [0, 0, 0, 5, 6, 7]  # row 0 unchanged, padded again


def test_word_ids_give_the_word_initial_form():
    """A word after a space is 100 + its length here. BPE-like: only a leading space marks the first word.
    SentencePiece-like: every word is marked (dummy prefix) and a leading space becomes a lone token 0. Both
    give the disturbance as it reads after a space inside a prompt."""
    from vlmfix.decoding.prompt_inputs import word_ids

    class Tokenizer:
        def __init__(self, dummy_prefix: bool) -> None:
            self.dummy_prefix = dummy_prefix

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            spaced = text.startswith(" ")
            words = [len(w) + (100 if i or spaced or self.dummy_prefix else 0)
                     for i, w in enumerate(text.split())]
            return ([0] if self.dummy_prefix and spaced else []) + words

    assert Tokenizer(dummy_prefix=True).encode(" ab c") == [0, 102, 101]
    assert Tokenizer(dummy_prefix=False).encode("ab c") == [2, 101]
    assert word_ids(Tokenizer(dummy_prefix=True), "ab c") == [102, 101]
    assert word_ids(Tokenizer(dummy_prefix=False), "ab c") == [102, 101]


def test_system_splice_replaces_an_existing_system_text():
    """A tokenizer with BOS and a chat template that has a system turn (the toy's): the spliced ids equal the
    tokenized prompt whose system text is the disturbance, with or without a system text before."""
    from vlmfix.toy.tokenizer import CHAT_TEMPLATE, build_tokenizer

    system = "A chat between a curious human and an artificial intelligence assistant ."
    question = "is there a dog ?"
    tokenizer = build_tokenizer([system, question, DISTURBANCE, "USER: ASSISTANT:"])
    tokenizer.chat_template = CHAT_TEMPLATE
    adapter = vlmfix.get_adapter(tiny_model("llava").model)

    def ids(system_text: str | None) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if system_text is not None:
            messages.insert(0, {"role": "system", "content": system_text})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text)["input_ids"]

    want = ids(DISTURBANCE)
    assert want[0] == tokenizer.bos_token_id
    for before in (ids(system), ids(None)):
        splice = adapter.system_splice(before, DISTURBANCE, tokenizer)
        assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


def test_qwen_system_splice_replaces_the_default_system_message():
    tiny = tiny_model("qwen2_vl")
    adapter = vlmfix.get_adapter(tiny.model)
    prompt = tiny.prompt(QUESTIONS[1])
    with_default = tiny.tokenizer("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n" + prompt)["input_ids"]
    want = tiny.tokenizer(f"<|im_start|>system\n{DISTURBANCE}<|im_end|>\n{prompt}")["input_ids"]
    for before in (with_default, tiny.tokenizer(prompt)["input_ids"]):
        splice = adapter.system_splice(before, DISTURBANCE, tiny.tokenizer)
        assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


def byte_level_tokenizer(texts: list[str], specials: list[str]):
    """A small byte-level BPE tokenizer trained on `texts` (as DeepSeek's: line breaks are tokens of their own,
    a word after a space carries it, the first word after BOS does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0])


@pytest.mark.parametrize("family", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_deepseek_vl_system_splice_replaces_the_fixed_system_text(family):
    """DeepSeek-VL's template always writes a fixed system text after BOS: the system placement puts the
    disturbance in its place and keeps the blank line before `User:` (with the tiny processor, and with a
    byte-level tokenizer whose line breaks are tokens); a prompt without the system text gets the disturbance
    and the blank line after BOS."""
    adapter = vlmfix.get_adapter(tiny_model(family, layers=1).model)
    question = "is there a dog ?"
    bos, image = "<｜begin▁of▁sentence｜>", "<image_placeholder>"
    turns = f"User: {image}{question}\n\nAssistant:"
    tokenizer = byte_level_tokenizer([DEEPSEEK_SYSTEM_TEXT, DISTURBANCE, turns], [bos, image])

    def ids(system: str | None) -> list[int]:
        text = bos + (f"{system}\n\n" if system is not None else "") + turns
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    want = ids(DISTURBANCE)
    assert tokenizer.convert_ids_to_tokens(want).count("Ċ") == 4  # the blank lines are tokens here
    for before in (ids(DEEPSEEK_SYSTEM_TEXT), ids(None)):
        splice = adapter.system_splice(before, DISTURBANCE, tokenizer)
        assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want

    tiny = tiny_model(family, layers=1)
    before = tiny.tokenizer(tiny.prompt(question), add_special_tokens=False)["input_ids"]
    want = tiny.tokenizer(tiny.prompt(question).replace(DEEPSEEK_SYSTEM_TEXT, DISTURBANCE),
                          add_special_tokens=False)["input_ids"]
    splice = adapter.system_splice(before, DISTURBANCE, tiny.tokenizer)
    assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


def test_qianfan_ocr_system_splice_replaces_its_default_system_message():
    """Qianfan-OCR's template writes a default system message when the conversation has none: the system
    placement puts the disturbance in its place (not before it), as for Qwen2-VL."""
    tiny = tiny_model("qianfan_ocr", layers=1)
    adapter = vlmfix.get_adapter(tiny.model)
    prompt = tiny.prompt(QUESTIONS[1])
    assert prompt.startswith(f"<|im_start|>system\n{QIANFAN_SYSTEM_TEXT}<|im_end|>\n<|im_start|>user\n")
    before = tiny.tokenizer(prompt)["input_ids"]
    want = tiny.tokenizer(prompt.replace(QIANFAN_SYSTEM_TEXT, DISTURBANCE))["input_ids"]
    splice = adapter.system_splice(before, DISTURBANCE, tiny.tokenizer)
    assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


@pytest.mark.parametrize("family", ["internvl", "llava_onevision", "aria", "qwen3_vl", "hy_v4_vl"])
def test_chatml_family_system_splice_is_the_template_s_system_message(family):
    """A ChatML family (common layout; HY V4 VL with its own adapter), no system message by default: the system
    placement gives the ids of the chat template's conversation with the disturbance as its system message, from a
    conversation with no system message and from one with another."""
    tiny = tiny_model(family, layers=1)
    adapter = vlmfix.get_adapter(tiny.model)

    def ids(system: str | None) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        text = tiny.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tiny.tokenizer(text)["input_ids"]

    want = ids(DISTURBANCE)
    for before in (ids(None), ids("you are a helpful assistant .")):
        splice = adapter.system_splice(before, DISTURBANCE, tiny.tokenizer)
        assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


def test_chatml_system_splice_with_line_break_tokens():
    """ChatML with a byte-level tokenizer (line breaks are tokens): a default system message is replaced, an empty
    system turn (LightOnOCR's `<|im_start|>system<|im_end|>`) is filled, a prompt without one gets one; a prompt
    with no ChatML turn is refused."""
    from vlmfix.adapters.qwen2_vl import chatml_system_splice
    from vlmfix.errors import SpanError

    turns = "<|im_start|>user\n<image>is there a dog ?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer = byte_level_tokenizer(["you are a helpful assistant .", DISTURBANCE, turns, "system"],
                                     ["<s>", "<|im_start|>", "<|im_end|>", "<image>"])

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for bos in ("", "<s>"):  # a ChatML tokenizer with a BOS gets the new system message after it
        want = ids(f"{bos}<|im_start|>system\n{DISTURBANCE}<|im_end|>\n{turns}")
        assert tokenizer.convert_ids_to_tokens(want).count("Ċ") == 5  # each line break is a token here
        for system in ("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n",
                       "<|im_start|>system<|im_end|>\n", ""):
            before = ids(bos + system + turns)
            splice = chatml_system_splice(before, DISTURBANCE, tokenizer)
            assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want
    with pytest.raises(SpanError, match="no <\\|im_start\\|> turn, so it is not a ChatML prompt"):
        chatml_system_splice(ids("User: <image>is there a dog ?"), DISTURBANCE, tokenizer)


def deepseek_byte_level(adapter, texts: list[str]):
    """A byte-level tokenizer for DeepSeek-VL's prompt whose image placeholder has the tiny model's image id."""
    bos, image = "<｜begin▁of▁sentence｜>", "<image_placeholder>"
    fillers = [f"<filler_{i}>" for i in range(adapter.image_token_id - 1)]
    tokenizer = byte_level_tokenizer(texts, [bos, *fillers, image])
    assert tokenizer.convert_tokens_to_ids(image) == adapter.image_token_id
    return tokenizer


@pytest.mark.parametrize("family", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_deepseek_vl_after_image_splice_keeps_the_question_apart(family):
    """DeepSeek-VL's template writes the question right after the image placeholder: the after-image placement
    gives the ids of `<image_placeholder> d\\n{question}` (a byte-level tokenizer spells the question's first word
    after a line break as after the placeholder), not the disturbance glued to the question."""
    adapter = vlmfix.get_adapter(tiny_model(family, layers=1).model)
    bos, image, question = "<｜begin▁of▁sentence｜>", "<image_placeholder>", "Is there a dog ?"
    prompt = f"{bos}{DEEPSEEK_SYSTEM_TEXT}\n\nUser: {image}{question}\n\nAssistant:"
    tokenizer = deepseek_byte_level(adapter, [DEEPSEEK_SYSTEM_TEXT, DISTURBANCE, prompt])
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want = tokenizer(prompt.replace(image, f"{image} {DISTURBANCE}\n"), add_special_tokens=False)["input_ids"]
    splice = adapter.after_image_splice(before, DISTURBANCE, tokenizer)
    assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


def test_deepseek_vl_system_splice_refuses_text_it_cannot_place():
    """A row whose `User:` no spelling finds but with text after BOS: a SpanError, not the disturbance written
    beside that text; a row whose image comes right after BOS gets the disturbance and the blank line there."""
    from vlmfix.errors import SpanError

    adapter = vlmfix.get_adapter(tiny_model("deepseek_vl", layers=1).model)
    bos, image = "<｜begin▁of▁sentence｜>", "<image_placeholder>"
    texts = [DEEPSEEK_SYSTEM_TEXT, DISTURBANCE, f"USER {image}is there a dog ?\n\nAssistant:"]
    tokenizer = deepseek_byte_level(adapter, texts)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    with pytest.raises(SpanError, match="text between BOS and its first image but no 'User:'"):
        adapter.system_splice(ids(f"{bos}{DEEPSEEK_SYSTEM_TEXT}\n\nUSER {image}is there a dog ?"), DISTURBANCE,
                              tokenizer)
    before = ids(f"{bos}{image}is there a dog ?")
    splice = adapter.system_splice(before, DISTURBANCE, tokenizer)
    want = ids(f"{bos}{DISTURBANCE}\n\n{image}is there a dog ?")
    assert before[: splice.start] + list(splice.tokens) + before[splice.end :] == want


# ---------------------------------------------------------------------------------------------
# on tiny models


def test_alpha_zero_and_empty_disturbance_are_greedy(family):
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    before = snapshot(inputs)
    plain = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for method in (ICD(alpha=0.0, beta=None), ICD(alpha=0.0, placement="after_image")):
        out = vlmfix.generate(tiny.model, **inputs, methods=[method], tokenizer=tiny.processor, max_new_tokens=5,
                              do_sample=False)
        assert torch.equal(out, plain)
    same = Recording(alpha=1.0, disturbance="")
    out, report = run(tiny, inputs, same, 3)
    assert all(torch.equal(p, n) for p, n in same._seen)  # both streams see the same prompt
    assert torch.equal(out.sequences, tiny.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3,
                                                          do_sample=False))
    assert report["icd"]["inserted_tokens"] == [None, None] and report["icd"]["changed_top_token"] == [0, 0]
    assert_unchanged(inputs, before)


@pytest.mark.parametrize(("family", "placement"), [
    *[(family, placement) for family in ("llava", "qwen2_vl", "deepseek_vl", "qianfan_ocr")
      for placement in ("system", "after_image")],
    ("internvl", "system"),  # a common-layout ChatML family without a default system message
])
def test_streams_and_scores_match_plain_forwards(family, placement):
    """The negative rows' logits equal a plain forward of the disturbed prompt built by the processor, at the
    prefill and three decode steps; the scores are the spec's contrast of the two plain forwards."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    disturbed = disturbed_inputs(tiny, QUESTIONS, DISTURBANCE, placement)
    before = snapshot(inputs)
    method = Recording(alpha=1.0, beta=0.1, placement=placement)
    # a generated image placeholder would make the processor-built reference forward ask for one image more
    out, report = run(tiny, inputs, method, 4, suppress_tokens=[tiny.model.config.image_token_id])
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert len(method._seen) == 4
    for step, (positive, negative) in enumerate(method._seen):
        plain = plain_next_logits(tiny.model, grown(inputs, tokens[:, :step]))
        wanted_negative = plain_next_logits(tiny.model, grown(disturbed, tokens[:, :step]))
        torch.testing.assert_close(positive, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(negative, wanted_negative, atol=1e-5, rtol=1e-5)
        want = contrast_reference(plain, wanted_negative, 1.0, 0.1)
        assert_scores_close(out.logits[step], want)
        want[:, tiny.model.config.image_token_id] = -math.inf  # suppressed after the contrast
        assert torch.equal(want.argmax(-1), tokens[:, step])
    icd = report["icd"]
    lengths = disturbed["attention_mask"].sum(1) - inputs["attention_mask"].sum(1)
    assert [n - r for n, r in zip(icd["inserted_tokens"], icd["replaced_tokens"])] == lengths.tolist()
    assert icd["applied"]["contrast_steps"] == 4
    assert_unchanged(inputs, before)


def test_greedy_applies_the_contrast_and_the_report_says_so():
    """Regression for the official code, where greedy silently skipped the contrast."""
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    out, report = run(tiny, inputs, ICD(alpha=1.0), 6)
    assert not torch.equal(out.sequences, plain)
    assert sum(report["icd"]["changed_top_token"]) > 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_rows_equal_rows_alone(family):
    tiny = tiny_model(family)
    batch = tiny.inputs(QUESTIONS)
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    for placement in ("system", "after_image"):
        assert_batch_rows_equal_rows_alone(tiny, batch, [ICD(placement=placement)], steps=3, tokenizer=tiny.processor)


def test_composes_with_an_attention_method():
    """PAI's boost (no refinement) edits the plain rows only; ICD contrasts them with the unedited disturbed rows."""
    tiny = tiny_model("llava", layers=5)
    inputs = tiny.inputs(QUESTIONS)
    disturbed = disturbed_inputs(tiny, QUESTIONS, DISTURBANCE, "system")
    alpha = 4.0
    out, report = run(tiny, inputs, ICD(alpha=1.0), 3, PAI(alpha=alpha, cfg=False))
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_len:]
    edit = pai_row_edit(alpha, image_positions(tiny, inputs))
    for step in range(3):
        positive = reference_logits(tiny.model, grown(inputs, tokens[:, :step]), {2, 3, 4}, edit, prompt_len - 1)
        negative = plain_next_logits(tiny.model, grown(disturbed, tokens[:, :step]))
        assert_scores_close(out.logits[step], contrast_reference(positive[:, -1], negative, 1.0, 0.1))
    assert report["pai"]["applied"]["attention_calls"] > 0 and report["icd"]["applied"]["contrast_steps"] == 3
    with pytest.raises(ValueError, match="exactly one contrastive method per call is supported, got 2: icd, m3id"):
        vlmfix.generate(tiny.model, **inputs, methods=[ICD(), vlmfix.M3ID()], tokenizer=tiny.processor,
                        max_new_tokens=2)


def test_sampling_and_beams_run():
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    kw = dict(methods=["icd"], tokenizer=tiny.processor, do_sample=True, max_new_tokens=4)
    torch.manual_seed(0)
    sampled = vlmfix.generate(tiny.model, **inputs, **kw)
    torch.manual_seed(0)
    assert torch.equal(sampled, vlmfix.generate(tiny.model, **inputs, **kw))
    beams = vlmfix.generate(tiny.model, **inputs, methods=[ICD(placement="after_image")], tokenizer=tiny.processor,
                            num_beams=2, num_return_sequences=2, max_new_tokens=4)
    assert beams.shape[0] == 4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_supplied_negative_inputs_are_the_negative_stream(family):
    """Spec D7: a caller-built negative prompt (here one the splice cannot build: a system text AND a role prefix
    after the image, for Qwen shifting the M-RoPE positions after the image) is the negative stream: its logits
    equal a plain forward of that processor output, at the prefill and three decode steps."""
    tiny = tiny_model(family)
    inputs = tiny.inputs(QUESTIONS)
    caller_built = disturbed_inputs(tiny, QUESTIONS, "you are a careless captioner .", "after_image")
    before, before_negative = snapshot(inputs), snapshot(caller_built)
    method = Recording(alpha=1.0, beta=0.1, negative_inputs=caller_built)
    out, report = run(tiny, inputs, method, 4, suppress_tokens=[tiny.model.config.image_token_id])
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert len(method._seen) == 4
    for step, (positive, negative) in enumerate(method._seen):
        torch.testing.assert_close(positive, plain_next_logits(tiny.model, grown(inputs, tokens[:, :step])),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(negative, plain_next_logits(tiny.model, grown(caller_built, tokens[:, :step])),
                                   atol=1e-5, rtol=1e-5)
    icd = report["icd"]
    assert icd["negative_inputs"] is True and icd["disturbance"] is None and icd["placement"] is None
    assert icd["applied"]["contrast_steps"] == 4
    lengths = caller_built["attention_mask"].sum(1) - inputs["attention_mask"].sum(1)
    assert [n - r for n, r in zip(icd["inserted_tokens"], icd["replaced_tokens"])] == lengths.tolist()
    assert_unchanged(inputs, before)
    assert_unchanged(caller_built, before_negative)


@pytest.mark.parametrize("placement", ["system", "after_image"])
def test_supplying_the_splice_s_prompt_gives_the_splice_s_tokens(placement):
    """The processor's version of exactly the prompt the splice builds decodes the same tokens as the splice:
    greedy, and beam search (each prompt's negative row repeated for its beams)."""
    tiny = tiny_model("qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    supplied = disturbed_inputs(tiny, QUESTIONS, DISTURBANCE, placement)
    supplied_without_images = {k: v for k, v in supplied.items() if k in ("input_ids", "attention_mask")}
    for kw in (dict(do_sample=False), dict(num_beams=2, num_return_sequences=2)):
        spliced = vlmfix.generate(tiny.model, **inputs, methods=[ICD(placement=placement)], tokenizer=tiny.processor,
                                  max_new_tokens=4, **kw)
        for negative in (supplied, supplied_without_images):
            given = vlmfix.generate(tiny.model, **inputs, methods=[ICD(negative_inputs=negative)],
                                    tokenizer=tiny.processor, max_new_tokens=4, **kw)
            assert torch.equal(given, spliced)


def test_supplied_negative_inputs_that_do_not_fit_raise_before_any_forward():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    disturbed = disturbed_inputs(tiny, QUESTIONS, DISTURBANCE, "system")
    other_images = disturbed_inputs(tiny, QUESTIONS, DISTURBANCE, "system", image_seed=5)
    both_sides = dict(tiny.processor(text=[f"{DISTURBANCE} {tiny.prompt(q + ' answer in one word .')}"
                                           for q in QUESTIONS],
                                     images=[random_image(48 + 16 * i, i) for i in range(2)], return_tensors="pt",
                                     padding=True))
    no_image = dict(tiny.processor(text=[f"{DISTURBANCE} {tiny.prompt(q, with_image=False)}" for q in QUESTIONS],
                                   return_tensors="pt", padding=True))
    cases = [
        ({k: v[:1] for k, v in disturbed.items()}, r"negative_inputs has 1 rows, but the call has 2 prompts"),
        (other_images, r"negative_inputs\['pixel_values'\] differs from the call's pixel_values: ICD keeps the image"),
        (both_sides, r"row 0 does not hold the same image tokens .* across image tokens"),
        (no_image, r"row 0 does not hold the same image tokens"),
    ]
    calls: list[int] = []
    handle = tiny.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for negative, message in cases:
            with pytest.raises(ValueError, match=message):
                vlmfix.generate(tiny.model, **inputs, methods=[ICD(negative_inputs=negative)],
                                tokenizer=tiny.processor, max_new_tokens=2)
    finally:
        handle.remove()
    assert calls == []  # every refusal comes before the model ran (the vision tower included)
    with pytest.raises(ValueError, match=r"`negative_inputs` must be the processor's output .* got 3 \(an int\)"):
        ICD(negative_inputs=3)
    with pytest.raises(ValueError, match=r"negative_inputs\['attention_mask'\]` must be a tensor of input_ids' shape"):
        ICD(negative_inputs={"input_ids": disturbed["input_ids"], "attention_mask": disturbed["attention_mask"][:, 1:]})
    assert "negative_inputs={'input_ids': [2, " in repr(ICD(negative_inputs=disturbed))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=-1), r"`alpha` must be a finite number >= 0, got -1"),
        (dict(alpha="1"), r"`alpha` must be a finite number >= 0, got '1' \(a str\)"),
        (dict(beta=0), r"`beta` must be None or a finite number in \(0, 1\], got 0"),
        (dict(placement="before_image"), r"`placement` must be one of 'system', 'after_image'"),
        (dict(disturbance=3), r"`disturbance` must be a string, got 3 \(an int\); disturbance is the role prefix"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ICD(**kwargs)


def test_needs_the_tokenizer_and_the_engine_before_any_forward():
    tiny = tiny_model("llava")
    calls: list[int] = []
    handle = tiny.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="icd need the tokenizer.*pass tokenizer=processor"):
            vlmfix.generate(tiny.model, **tiny.inputs(QUESTIONS), methods=[ICD()], max_new_tokens=2)
        with pytest.raises(vlmfix.SessionError, match="ICD is a two-stream method: call session.generate"):
            with vlmfix.apply(tiny.model, ICD(), tokenizer=tiny.processor):
                tiny.model.generate(**tiny.inputs(QUESTIONS), max_new_tokens=2)
    finally:
        handle.remove()
    assert calls == []  # both refusals come before the model ran
    assert vlmfix.methods.get("icd") is ICD and vlmfix.ICD is ICD
