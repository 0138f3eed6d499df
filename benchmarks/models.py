"""Model loaders named by `conf/model/*.yaml` (`loader._target_`), and their setting checks.

Each loader here has a check (`LOADERS`) that the app runs on the loader's settings before anything
is loaded; the loaders run it too, so a direct call fails the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmfix.validation import boolean, choice, number, text

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoadedModel:
    """A model, its processor, and COCO-format data that ships with it (the toy's), if any."""

    model: Any
    processor: Any
    source: str
    revision: str | None = None
    data_root: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def check_toy(fast: bool = False, seed: int = 0) -> None:
    """Check `load_toy`'s settings."""
    boolean(fast, "model.loader.fast", meaning="the small toy build (set model=toy_fast or model=toy)")
    number(seed, "model.loader.seed", low=0, integer=True, meaning="the toy build's seed; set model.loader.seed=<int>")


@functools.lru_cache(maxsize=2)
def load_toy(fast: bool = False, seed: int = 0) -> LoadedModel:
    """Build (or reuse from the cache) the toy VLM and return it with its data."""
    from vlmfix.toy import build_toy

    check_toy(fast, seed)

    paths = build_toy(fast=fast, seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(paths.model_dir).eval()
    processor = AutoProcessor.from_pretrained(paths.model_dir)
    return LoadedModel(model, processor, source=f"vlmfix-toy{'-fast' if fast else ''}", revision=paths.settings_hash,
                       data_root=Path(paths.data_dir), extras={"toy": paths})


def check_pretrained(
    path: str,
    torch_dtype: str = "bfloat16",
    attn_implementation: str | None = "sdpa",
    device: str = "auto",
    local_files_only: bool = True,
    trust_remote_code: bool = False,
    model_class: str | None = None,
    revision: str | None = None,
) -> None:
    """Check `load_pretrained`'s settings; with `local_files_only`, `path` must be a checkpoint directory or
    a hub id in the local hub cache (`FileNotFoundError` otherwise)."""
    text(path, "model.loader.path", meaning="a checkpoint directory or a hub id in the local hub cache")
    choice(torch_dtype, "model.loader.torch_dtype", DTYPES)
    if attn_implementation is not None:  # None: transformers' default for each sub-model (SDPA where it has one)
        text(attn_implementation, "model.loader.attn_implementation",
             meaning="e.g. sdpa, eager or flash_attention_2, or null for transformers' default per sub-model")
    text(device, "model.loader.device", meaning="auto, cpu, cuda or cuda:<index>")
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"`model.loader.device` must be auto or a torch device such as cpu, cuda or cuda:1, "
                             f"got {device!r}.") from None
    boolean(local_files_only, "model.loader.local_files_only")
    boolean(trust_remote_code, "model.loader.trust_remote_code")
    if model_class is not None:
        model_loader(model_class)
    if revision is not None:
        text(revision, "model.loader.revision", meaning="a branch, tag, commit or refs/pr/<n> of the hub repository")
    if local_files_only:
        check_local_checkpoint(path, revision)


def model_loader(model_class: str | None) -> Any:
    """The class that loads the checkpoint: AutoModelForImageTextToText, or the transformers model class named
    (a checkpoint whose config that mapping does not take, e.g. Qwen2.5-Omni's thinker inside the full model)."""
    if model_class is None:
        return AutoModelForImageTextToText
    text(model_class, "model.loader.model_class", meaning="a transformers model class name, or null")
    import transformers

    try:
        found = getattr(transformers, model_class, None)
    except Exception:  # transformers' lazy module raises when the class exists but cannot be imported
        found = None
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
        raise ValueError(f"`model.loader.model_class` {model_class!r} is not a transformers model class; name one "
                         "such as Qwen2_5OmniThinkerForConditionalGeneration, or null for "
                         "AutoModelForImageTextToText.")
    return found


def check_local_checkpoint(path: str, revision: str | None = None) -> None:
    """`path` must be a directory holding config.json, or a hub id whose config.json (at `revision`) is in the local
    cache."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"`model.loader.path` {path!r} holds no config.json; point it at a checkpoint "
                                    "directory (what save_pretrained writes).")
        return
    if not in_hub_cache(path, revision):
        from huggingface_hub.constants import HF_HUB_CACHE

        at = "" if revision is None else f" at revision {revision!r}"
        raise FileNotFoundError(
            f"`model.loader.path` {path!r} is neither a checkpoint directory nor a model in the local hub cache{at} "
            f"({HF_HUB_CACHE}); nothing is downloaded. Set model.loader.path=<checkpoint dir> (or the preset's "
            "environment variable), or put the checkpoint in the local hub cache."
        )


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the local hub cache holds `repo_id`'s config.json at `revision` (an invalid id is simply not there)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except HFValidationError:
        return False


@dataclass(frozen=True)
class LoaderSpec:
    """What the app knows about a loader before calling it: its settings check, and whether it brings data."""

    check: Callable[..., None]
    ships_data: bool


LOADERS: dict[str, LoaderSpec] = {
    "benchmarks.models.load_toy": LoaderSpec(check_toy, ships_data=True),
    "benchmarks.models.load_pretrained": LoaderSpec(check_pretrained, ships_data=False),
}


@functools.lru_cache(maxsize=1)
def load_pretrained(
    path: str,
    torch_dtype: str = "bfloat16",
    attn_implementation: str | None = "sdpa",
    device: str = "auto",
    local_files_only: bool = True,
    trust_remote_code: bool = False,
    model_class: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a checkpoint from a local directory or the local hub cache (never downloads by default), with
    AutoModelForImageTextToText or the transformers class `model_class` names, at the hub `revision` (None: main)."""
    check_pretrained(path, torch_dtype, attn_implementation, device, local_files_only, trust_remote_code, model_class,
                     revision)
    loader = model_loader(model_class)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = loader.from_pretrained(
            path, dtype=getattr(torch, torch_dtype), attn_implementation=attn_implementation,
            local_files_only=local_files_only, trust_remote_code=trust_remote_code, revision=revision,
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                  trust_remote_code=trust_remote_code, revision=revision)
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot load {path!r} from local files: {err}. Point the model preset at a local directory "
            f"(e.g. VLMFIX_LLAVA15_7B=/models/llava-1.5-7b-hf) or put the checkpoint in the local hub cache."
        ) from err
    except ValueError as err:
        if model_class is not None or not str(err).startswith("Unrecognized configuration class"):
            raise
        raise ValueError(
            f"AutoModelForImageTextToText does not load {path!r}: {str(err).splitlines()[0]} Set "
            "model.loader.model_class to the class that loads it (Qwen2.5-Omni: "
            "Qwen2_5OmniThinkerForConditionalGeneration, its text-out part)."
        ) from None
    processor.tokenizer.padding_side = "left"
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model.to(device).eval(),  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides self
                       processor, source=str(path), revision=commit)
