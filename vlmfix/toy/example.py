"""A model, processor and inputs in one line, for docstring examples and quick looks."""

from __future__ import annotations

from typing import Any

from PIL import Image

from .build import build_toy
from .captions import CAPTION_PROMPT


def load_example(*, fast: bool = True, images: int = 1, text: str = CAPTION_PROMPT) -> tuple[Any, Any, dict]:
    """(model, processor, inputs): the toy (built or reused) and its first `images` validation images,
    each with `text` in the chat template, left-padded, as `processor(...)` returns them.

    Example:
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example(images=2)
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.PAI()], max_new_tokens=16)
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}.")
    paths = build_toy(fast=fast)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir).eval()
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    files = sorted((paths.data_dir / "images" / "val").glob("*.png"))
    if len(files) < images:
        raise ValueError(f"images={images}, but this toy build has {len(files)} validation images.")
    files = files[:images]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    pictures = [Image.open(file).convert("RGB") for file in files]
    inputs = processor(images=pictures, text=[prompt] * len(pictures), padding=True, return_tensors="pt")
    return model, processor, dict(inputs)
