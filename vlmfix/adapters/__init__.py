"""Model adapters: one small declarative module per family, looked up by model class."""

from __future__ import annotations

from torch import nn

from vlmfix.adapters.apertus1p5 import Apertus1p5Adapter
from vlmfix.adapters.base import Adapter, Spans
from vlmfix.adapters.deepseek_vl import DeepseekVLAdapter, DeepseekVLHybridAdapter
from vlmfix.adapters.dots3_note import Dots3NoteAdapter
from vlmfix.adapters.families import COMMON_LAYOUT
from vlmfix.adapters.fuyu import FuyuAdapter
from vlmfix.adapters.hy_v4_vl import HYV4VLAdapter
from vlmfix.adapters.llava import LlavaAdapter
from vlmfix.adapters.llava_next import LlavaNextAdapter
from vlmfix.adapters.qwen2_5_vl import Qwen25VLAdapter
from vlmfix.adapters.qwen2_vl import Qwen2VLAdapter
from vlmfix.adapters.refusals import REFUSED, Refusal
from vlmfix.adapters.step3p7 import Step3p7Adapter
from vlmfix.errors import UnsupportedModelError

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter, *COMMON_LAYOUT,
                                       FuyuAdapter, Step3p7Adapter, Apertus1p5Adapter, Dots3NoteAdapter,
                                       DeepseekVLAdapter, DeepseekVLHybridAdapter, HYV4VLAdapter)
SUPPORTED_CLASSES: dict[str, type[Adapter]] = {name: a for a in ADAPTERS for name in a.model_classes}


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of `model`'s class; raises `UnsupportedModelError` with the reason for a refused class
    (`vlmfix.adapters.refusals`), listing the supported classes."""
    name = type(model).__name__
    refusal = REFUSED.get(name)
    if refusal is not None and name not in SUPPORTED_CLASSES:
        raise UnsupportedModelError(
            f"vlmfix does not run {name}: {refusal.reason}. Supported model classes: "
            f"{', '.join(sorted(SUPPORTED_CLASSES))}."
        )
    if name not in SUPPORTED_CLASSES:
        raise UnsupportedModelError(
            f"vlmfix has no adapter for {name}. Supported model classes: {', '.join(sorted(SUPPORTED_CLASSES))}. "
            "Load the model with its ...ForConditionalGeneration class (AutoModelForImageTextToText does this)."
        )
    return SUPPORTED_CLASSES[name](model)


__all__ = ["Adapter", "Spans", "get_adapter", "SUPPORTED_CLASSES", "REFUSED", "Refusal", "UnsupportedModelError"]
