"""DeepSeek-VL (`DeepseekVLForConditionalGeneration`) and its hybrid (`DeepseekVLHybridForConditionalGeneration`,
a SAM high-resolution branch beside SigLIP): the common layout, with the system slot of their chat template.

Prompt (both): `<｜begin▁of▁sentence｜>{system}\\n\\nUser: <image_placeholder>×N{instruction}\\n\\nAssistant:`, where
`{system}` is a fixed text the template always writes ("You are a helpful language and vision assistant. ...").
ICD's "system" placement replaces that text with its disturbance and keeps the blank line before `User:`, as the
official ICD code swaps LLaVA's system prompt for it (specs/icd.md §3.1); the base adapter, which finds no user
marker here, would insert the disturbance before the fixed text and keep both. Its "after_image" placement ends
the disturbance with a line break, since the template writes the question right after the image placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.adapters.base import Adapter, spellings
from vlmfix.decoding.prompt_inputs import Splice, after_bos, find_ids, word_ids
from vlmfix.errors import SpanError

# what the template writes between the system text and `User:`
SYSTEM_SEPARATOR = "\n\n"
# what ICD's after-image placement writes between its text and the question, which the template glues to the image
# placeholder: a line break keeps the question's first word spelled as it is after the placeholder (byte-level BPE
# gives a word after a space other ids: "ĠIs", not "Is")
QUESTION_SEPARATOR = "\n"


@dataclass(frozen=True)
class DeepseekVLAdapter(Adapter):
    family: ClassVar[str] = "deepseek_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("DeepseekVLForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("Assistant:",)
    user_markers: ClassVar[tuple[str, ...]] = ("User:",)

    def system_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Put `text` in place of the system text (after BOS, up to `User:`), spelled as the template spells a
        system text: right after BOS, no leading space, then the blank line. Line-break tokens of their own before
        `User:` are kept (and not written again). A row without `User:` gets `text` and the blank line after BOS
        when its image comes right after BOS; other text there (a system text this tokenizer's `User:` spellings
        did not find the end of) raises a SpanError rather than keeping it beside `text`."""
        start = after_bos(row, tokenizer)
        needles = [ids for marker in self.user_markers for ids in spellings(tokenizer, marker)]
        found = find_ids(row, needles, start)
        if found is None:
            image = self.image_mask(torch.tensor([list(row)]))[0].nonzero().flatten()
            first_image = int(image[0]) if len(image) else len(row)
            if first_image > start:
                raise SpanError(f"the prompt row has text between BOS and its first image but no "
                                f"{self.user_markers[0]!r} that ends a system text, so ICD's system placement cannot "
                                f"tell what to replace; build the prompt with the processor's chat template, or use "
                                f"placement='after_image'.")
            return Splice(start, start, tuple(tokenizer.encode(text + SYSTEM_SEPARATOR, add_special_tokens=False)))
        end = found[0]
        while end > start and not tokenizer.decode([row[end - 1]]).strip():  # whitespace-only tokens: the separator
            end -= 1
        kept_separator = end < found[0]
        written = text if kept_separator else text + SYSTEM_SEPARATOR
        return Splice(start, end, tuple(tokenizer.encode(written, add_special_tokens=False)))

    def after_image_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Insert `text` after the row's last image token, then a line break before the question that the template
        writes right after the image (`<image_placeholder> text\\n{question}`, not `... text{question}`)."""
        splice = super().after_image_splice(row, text, tokenizer)
        return Splice(splice.start, splice.end, (*splice.tokens, *separator_ids(tokenizer, text, QUESTION_SEPARATOR)))


def separator_ids(tokenizer: Any, text: str, separator: str) -> list[int]:
    """The ids `separator` adds after `text` (a SentencePiece tokenizer spells a separator alone with its dummy
    prefix, which it lacks after a word)."""
    words, joined = word_ids(tokenizer, text), word_ids(tokenizer, text + separator)
    if joined[: len(words)] == words:
        return joined[len(words):]
    return tokenizer.encode(separator, add_special_tokens=False)


@dataclass(frozen=True)
class DeepseekVLHybridAdapter(DeepseekVLAdapter):
    family: ClassVar[str] = "deepseek_vl_hybrid"
    model_classes: ClassVar[tuple[str, ...]] = ("DeepseekVLHybridForConditionalGeneration",)
