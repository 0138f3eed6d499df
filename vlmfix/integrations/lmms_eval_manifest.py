"""The `lmms_eval.models` entry point: lmms-eval calls `manifest()` to learn the `vlmfix` model's class path.

Kept tiny and import-free until called: importing lmms_eval reconfigures loguru, so nothing happens at import.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlmfix"
CLASS_PATH = "vlmfix.integrations.lmms_eval.VlmfixLMM"


def manifest() -> Any:
    """lmms-eval's `ModelManifest` of the `vlmfix` model (a simple model: context + images in, text out)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
