"""Prompt building shared by the benchmark app (`benchmarks.generation`) and the lmms-eval plugin
(`vlmfix.integrations.lmms_eval`), so both send a model the same text for the same question."""

from __future__ import annotations

from typing import Any


def chat_prompt(processor: Any, text: str, image: bool = True) -> str:
    """The processor's chat template around one user turn: one image entry (unless `image` is False), then `text`;
    `text` itself where the processor has no chat template and writes the prompt itself (Fuyu)."""
    if getattr(processor, "chat_template", "") is None:
        return text
    content = [{"type": "image"}] if image else []
    conversation = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
