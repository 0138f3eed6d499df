"""The embedded default model: synthetic COCO-format scenes with a co-occurrence prior and a tiny LLaVA.

    paths = vlmfix.toy.build_toy()            # or: python -m vlmfix.toy build --out DIR [--fast]
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir)
    model, processor, inputs = vlmfix.toy.load_example()   # the fast toy and a captioning input

The model really sees (it names most present objects and answers yes/no questions) and really
hallucinates: objects of `PAIRS` co-occur in training, so on validation images holding one member
alone it often names the absent partner.
"""

from .build import FAST, FULL, ToyPaths, ToySettings, build_toy, default_root
from .captions import CAPTION_PROMPT, QUESTION_TEMPLATE, question
from .categories import CATEGORIES, PAIRS, PARTNER, Category, Glyph, find_mentions
from .example import load_example

__all__ = [
    "CAPTION_PROMPT",
    "CATEGORIES",
    "FAST",
    "FULL",
    "PAIRS",
    "PARTNER",
    "QUESTION_TEMPLATE",
    "Category",
    "Glyph",
    "ToyPaths",
    "ToySettings",
    "build_toy",
    "default_root",
    "find_mentions",
    "load_example",
    "question",
]
