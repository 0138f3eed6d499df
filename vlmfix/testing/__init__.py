"""Tiny offline models of every supported family, and the conformance suite that checks vlmfix on them.

```python
from vlmfix.testing import build_tiny
tiny = build_tiny("llava")
inputs = tiny.inputs(["Describe this image.", "Is there a dog?"])
out = tiny.model.generate(**inputs, max_new_tokens=8)
```
`vlmfix.testing.conformance` holds the suite (`python -m vlmfix.testing.conformance --table`).
"""

from vlmfix.testing.tiny import (
    ALL_FAMILIES,
    FAMILIES,
    TORCHVISION_FAMILIES,
    WORDS,
    Family,
    ImageOnlyQwen2VLProcessor,
    TinyVLM,
    build_tiny,
    random_image,
    word_tokenizer,
)

__all__ = ["ALL_FAMILIES", "FAMILIES", "WORDS", "Family", "ImageOnlyQwen2VLProcessor", "TinyVLM", "build_tiny",
           "random_image", "word_tokenizer", "TORCHVISION_FAMILIES"]
