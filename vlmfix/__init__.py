"""vlmfix: make Hugging Face vision-language models hallucinate less, and measure it.

```python
import vlmfix
out = vlmfix.generate(model, **inputs, methods=[vlmfix.VAR()], max_new_tokens=64)
with vlmfix.apply(model, vlmfix.VHR()) as session:
    out = model.generate(**inputs, max_new_tokens=64)
print(session.report())
```
"""

from vlmfix import methods
from vlmfix.adapters import SUPPORTED_CLASSES, Spans, get_adapter
from vlmfix.decoding import Method, Session, apply, generate, register_method
from vlmfix.errors import (
    CheckpointError,
    MissingImageError,
    PaddedBatchError,
    SessionError,
    SpanError,
    UnknownNameError,
    UnsupportedModelError,
    VlmfixError,
)
from vlmfix.methods import DCD, GIFT, ICD, M3ID, OPERA, PAI, SID, VAR, VCD, VHR, AvisC, DoLa, DualStream

__version__ = "0.1.0"

__all__ = [
    "generate", "apply", "Session", "Method", "register_method", "methods",
    "VHR", "VAR", "GIFT", "DualStream", "PAI", "VCD", "DCD", "M3ID", "ICD", "SID", "AvisC", "DoLa", "OPERA",
    "get_adapter", "Spans",
    "SUPPORTED_CLASSES", "VlmfixError", "UnsupportedModelError", "MissingImageError", "SpanError",
    "SessionError", "CheckpointError", "UnknownNameError", "PaddedBatchError", "__version__",
]
