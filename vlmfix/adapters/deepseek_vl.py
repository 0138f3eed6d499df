"""DeepSeek-VL (`DeepseekVLForConditionalGeneration`) and its hybrid (`DeepseekVLHybridForConditionalGeneration`,
a SAM high-resolution branch beside SigLIP): the common layout, with the system slot of their chat template.

Prompt (both): `<｜begin▁of▁sentence｜>{system}\\n\\nUser: <image_placeholder>×N{instruction}\\n\\nAssistant:`, where
`{system}` is a fixed text the template always writes ("You are a helpful language and vision assistant. ...").
ICD's "system" placement replaces that text with its disturbance and keeps the blank line before `User:`, as the
official ICD code swaps LLaVA's system prompt for it (specs/icd.md §3.1); the base adapter, which finds no user
marker here, would insert the disturbance before the fixed text and keep both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.adapters.base import Adapter
from vlmfix.decoding.prompt_inputs import Splice, find_ids

# what the template writes between the system text and `User:`
SYSTEM_SEPARATOR = "\n\n"


def spellings(tokenizer: Any, marker: str) -> list[list[int]]:
    """Token ids of `marker` as a prompt may spell it: alone, after a space, after a line break (a SentencePiece
    dummy prefix spells the word after a line break without its space marker)."""
    found = [tokenizer.encode(text, add_special_tokens=False) for text in (marker, " " + marker)]
    line_break = tokenizer.encode("\n", add_special_tokens=False)
    after_break = tokenizer.encode("\n" + marker, add_special_tokens=False)
    if line_break and after_break[: len(line_break)] == line_break:
        found.append(after_break[len(line_break):])
    return [ids for ids in found if ids]


@dataclass(frozen=True)
class DeepseekVLAdapter(Adapter):
    family: ClassVar[str] = "deepseek_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("DeepseekVLForConditionalGeneration",)
    assistant_markers: ClassVar[tuple[str, ...]] = ("Assistant:",)
    user_markers: ClassVar[tuple[str, ...]] = ("User:",)

    def system_splice(self, row: Sequence[int], text: str, tokenizer: Any) -> Splice:
        """Put `text` in place of the system text (after BOS, up to `User:`), spelled as the template spells a
        system text: right after BOS, no leading space, then the blank line. Line-break tokens of their own before
        `User:` are kept (and not written again); a row without `User:` gets `text` and the blank line after BOS."""
        bos = getattr(tokenizer, "bos_token_id", None)
        start = 1 if row and bos is not None and row[0] == bos else 0
        needles = [ids for marker in self.user_markers for ids in spellings(tokenizer, marker)]
        found = find_ids(row, needles, start)
        if found is None:
            return Splice(start, start, tuple(tokenizer.encode(text + SYSTEM_SEPARATOR, add_special_tokens=False)))
        end = found[0]
        while end > start and not tokenizer.decode([row[end - 1]]).strip():  # whitespace-only tokens: the separator
            end -= 1
        kept_separator = end < found[0]
        written = text if kept_separator else text + SYSTEM_SEPARATOR
        return Splice(start, end, tuple(tokenizer.encode(written, add_special_tokens=False)))


@dataclass(frozen=True)
class DeepseekVLHybridAdapter(DeepseekVLAdapter):
    family: ClassVar[str] = "deepseek_vl_hybrid"
    model_classes: ClassVar[tuple[str, ...]] = ("DeepseekVLHybridForConditionalGeneration",)
