"""The speed harness's model, prompts and methods: a random model shaped like one family (LLaVA-1.5, Qwen3-VL or
Gemma 3) with planted massive activations, so that every method, VAR included, edits on it.

Families (`--family`), each at its own image-token count and key/value grouping, sized by the same
layers / heads / head_dim options:
- llava: LLaVA-1.5, CLIP 336 px / patch 14: 576 image tokens; MHA.
- qwen3_vl: Qwen3-VL, patch 16 merged 2 x 2, images resized to 768 px: 24 x 24 = 576 image tokens; M-RoPE; DeepStack
  (vision blocks 0-2 feed decoder layers 0-2); 4 query heads per key/value head.
- gemma3: Gemma 3, SigLIP 224 px / patch 14, 256 image tokens (Gemma 3's fixed count); every 6th layer global,
  the others sliding-window (1024, Gemma 3's; the last layer global when the model has fewer than 6); 2 query
  heads per key/value head.
The vision towers are small (their cost is the prefill's, the same for every variant but the ones that encode
a second image).

A random model has no massive activations (|x_d| / rms(x) of a random hidden state stays below about 4), so
VAR finds no sink and edits nothing. `plant_sinks` gives the model what a real LLaVA has: the embedding row
of each prompt's first token and a few image tokens (written by a forward hook on the projector) carry
`MASSIVE` in the hidden dimensions `SINK_DIMS`, so |x_d| / rms(x) of those tokens is about
sqrt(hidden / 2) (32 at hidden 2048), and VAR runs with `sink_dims=SINK_DIMS` and a tau between that and
the ordinary tokens' ratios (`sink_tau`). Every variant, greedy included, runs on the same planted model.
"""

from __future__ import annotations

import ast
import importlib
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import vlmfix
from vlmfix.decoding.method import Method
from vlmfix.errors import UnsupportedModelError
from vlmfix.methods.dcd import CHECKPOINT_FILES, save_projector
from vlmfix.testing import TinyVLM, build_tiny

SINK_DIMS = (7, 41)  # hidden dimensions of the planted massive activations (the model needs hidden > 41)
MASSIVE = 1000.0  # real massive activations are hundreds to thousands of times the typical value
IMAGE_SINKS = (37, 211, 400, 515)  # image tokens (of LLaVA-1.5's 576 per image) planted as visual sinks
PROMPT = "describe this image ."
NO_METHOD = "none"  # the method spec of vlmfix with no method (the session's own overhead)
# a full run: every registered method with settings where it edits on the planted model
FULL_RUN = (NO_METHOD, "vhr", "var", "gift", "dual_stream:cfg=False", "dual_stream", "pai:cfg=False", "pai",
            "vcd", "dcd", "m3id", "icd", "sid", "avisc", "dola:layers=high")
# methods with their own beam search: timed against plain beam search by benchmarks/opera_speed.py (this
# harness times greedy calls through a streamer, which beam search does not take)
BEAM_SEARCH_METHODS = ("opera",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SPEED_FAMILIES = ("llava", "qwen3_vl", "gemma3")
IMAGE_TOKENS = {"llava": 576, "qwen3_vl": 576, "gemma3": 256}  # per prompt (one image)
KV_GROUPS = {"llava": 1, "qwen3_vl": 4, "gemma3": 2}  # query heads per key/value head (Qwen3-VL-8B, Gemma 3 4B)
# build_tiny options of the families built in vlmfix.testing.tiny_families
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "qwen3_vl": dict(image_side=768, patch_size=16, vision_depth=3, deepstack_layers=(0, 1, 2)),
    "gemma3": dict(image_size=224, patch_size=14, tokens_per_image=256, sliding_window=1024, global_every=6),
}


def llava_shaped(layers: int, heads: int, head_dim: int) -> TinyVLM:
    """Random LLaVA-1.5-shaped model: 576 image tokens (336 px / patch 14), MHA, sized by the arguments."""
    return family_shaped("llava", layers, heads, head_dim)


def kv_heads_of(family: str, heads: int, kv_heads: int | None = None) -> int:
    """`kv_heads`, or the family's grouping of `heads` (at least one key/value head)."""
    return kv_heads if kv_heads else max(1, heads // KV_GROUPS[family])


def family_shaped(family: str, layers: int, heads: int, head_dim: int, kv_heads: int | None = None) -> TinyVLM:
    """Random model of `family` (see the module docstring) with the given language-model shape."""
    if family not in SPEED_FAMILIES:
        raise ValueError(f"unknown speed family {family!r}; choose one of {', '.join(SPEED_FAMILIES)}.")
    kv = kv_heads_of(family, heads, kv_heads)
    if family == "llava":
        return build_tiny("llava", layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim, image_size=336,
                          patch_size=14)
    return build_tiny(family, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
                      options=FAMILY_OPTIONS[family])


def sink_tau(hidden_size: int) -> float:
    """VAR's tau on the planted model: the paper's 20 where the planted ratio (about sqrt(hidden / 2))
    clears it well, else 0.7 of that ratio (ordinary tokens of a random model stay below about 4)."""
    return min(20.0, 0.7 * math.sqrt(hidden_size / len(SINK_DIMS)))


def plant_sinks(tiny: TinyVLM) -> None:
    """Plant massive activations in `SINK_DIMS`: on the prompt's first token (its embedding row) and on the
    `IMAGE_SINKS` tokens of every image (a forward hook on the projector, which stays on the model)."""
    hidden = tiny.model.config.text_config.hidden_size
    if hidden <= max(SINK_DIMS):
        raise ValueError(f"the speed model needs a hidden size above {max(SINK_DIMS)} (heads x head_dim) to plant "
                         f"sinks in dimensions {list(SINK_DIMS)}; got {hidden}.")
    first = tiny.inputs([PROMPT])["input_ids"][0, 0]  # the chat template's first token ("USER", "<bos>", ...)
    with torch.no_grad():
        tiny.model.get_input_embeddings().weight[first, list(SINK_DIMS)] = MASSIVE
    per_image = IMAGE_TOKENS.get(tiny.family, 0)
    vlmfix.get_adapter(tiny.model).projector.register_forward_hook(
        lambda module, args, out: _plant_image_sinks(out, per_image))


def _plant_image_sinks(out: Tensor, per_image: int) -> Tensor:
    """Projector output [images, tokens, hidden] (or [images * tokens, hidden], Qwen's merger, with `per_image`
    tokens per image): `MASSIVE` in `SINK_DIMS` on the `IMAGE_SINKS` tokens of every image."""
    out = out.clone()
    images = out.view(-1, per_image, out.shape[-1]) if out.dim() == 2 and per_image else out
    tokens = [t for t in IMAGE_SINKS if t < images.shape[-2]]
    for dim in SINK_DIMS:
        images[..., tokens, dim] = MASSIVE  # a view: writes `out`
    return out


def speed_model(layers: int, heads: int, head_dim: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                *, family: str = "llava", kv_heads: int | None = None) -> TinyVLM:
    """The planted `family`-shaped model on `device` in `dtype` (same weights for the same shape)."""
    tiny = family_shaped(family, layers, heads, head_dim, kv_heads)
    plant_sinks(tiny)
    tiny.model.to(device=device, dtype=dtype)
    return tiny


def batch_inputs(tiny: TinyVLM, batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """`batch` prompts of `PROMPT`, each with its own image, on `device` (floating tensors in `dtype`)."""
    inputs = tiny.inputs([PROMPT] * batch)
    return {key: value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,key=value` (values read as Python literals, lists included) -> (name, kwargs)."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?=\s*\w+\s*=)", rest)):  # commas that start a new key=
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value (e.g. pai:cfg=False).")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw.strip()
    return name, kwargs


def method_by_name(name: str, **kwargs: Any) -> Method:
    """A registered method (importing its module if vlmfix has not yet)."""
    if name not in vlmfix.methods.names():
        try:
            importlib.import_module(f"vlmfix.decoding.{name}")
        except ModuleNotFoundError:
            pass
    return vlmfix.methods.create(name, **kwargs)


def stand_in_dcd(tiny: TinyVLM, directory: str, **kwargs: Any) -> Method:
    """DCD over copies of the model's own projector saved as its checkpoints (timing only)."""
    state = {name: t.clone() for name, t in vlmfix.get_adapter(tiny.model).projector.state_dict().items()}
    for stream, file in CHECKPOINT_FILES.items():
        save_projector(f"{directory}/{file}", state, tiny.model, stream)
    return vlmfix.DCD(directory, **kwargs)


def build_methods(spec: str, tiny: TinyVLM, stand_in_dir: str) -> list[Method]:
    """The methods of one spec on the planted model: `none` is no method; VAR gets the planted sink
    dimensions and `sink_tau` unless the spec sets them; DCD gets stand-in projectors in `stand_in_dir`."""
    name, kwargs = parse_method(spec)
    if name == NO_METHOD:
        return []
    if name == "dcd":
        return [stand_in_dcd(tiny, stand_in_dir, **kwargs)]
    if name == "var":
        kwargs.setdefault("sink_dims", list(SINK_DIMS))
        kwargs.setdefault("tau", sink_tau(tiny.model.config.text_config.hidden_size))
    return [method_by_name(name, **kwargs)]


def refusal(tiny: TinyVLM, methods: Sequence[Method]) -> str | None:
    """Why the model's family refuses `methods` (the session's check, before any work), or None."""
    try:
        vlmfix.apply(tiny.model, *methods, tokenizer=tiny.processor)  # builds the session; installs nothing
    except UnsupportedModelError as error:
        return str(error)
    except ValueError:  # a setting this model cannot serve (a layer past its depth): the timed run fails it, with why
        pass
    return None


def is_two_stream(methods: Sequence[Method]) -> bool:
    """Whether `methods` decode a second stream (contrastive methods; PAI/DualStream with refinement on)."""
    return any(getattr(m, "contrastive", False) for m in methods)
