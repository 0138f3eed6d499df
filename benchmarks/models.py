"""Model loaders named by `conf/model/*.yaml` (`loader._target_`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor


@dataclass
class LoadedModel:
    """A model, its processor, and COCO-format data that ships with it (the toy's), if any."""

    model: Any
    processor: Any
    source: str
    revision: str | None = None
    data_root: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=2)
def load_toy(fast: bool = False, seed: int = 0) -> LoadedModel:
    """Build (or reuse from the cache) the toy VLM and return it with its data."""
    from vlmfix.toy import build_toy

    paths = build_toy(fast=fast, seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir).eval()
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    return LoadedModel(model, processor, source=f"vlmfix-toy{'-fast' if fast else ''}", revision=paths.settings_hash,
                       data_root=Path(paths.data_dir), extras={"toy": paths})


@functools.lru_cache(maxsize=1)
def load_pretrained(
    path: str,
    torch_dtype: str = "bfloat16",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    local_files_only: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a checkpoint from a local directory or the local hub cache (never downloads by default)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, torch_dtype), attn_implementation=attn_implementation,
            local_files_only=local_files_only, trust_remote_code=trust_remote_code,
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                  trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot load {path!r} from local files: {err}. Point the model preset at a local directory "
            f"(e.g. VLMFIX_LLAVA15_7B=/models/llava-1.5-7b-hf) or put the checkpoint in the local hub cache."
        ) from err
    processor.tokenizer.padding_side = "left"
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model.to(device).eval(), processor, source=str(path), revision=revision)
