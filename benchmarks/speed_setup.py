"""The speed harness's model, prompts and methods: a LLaVA-shaped random model with planted massive
activations, so that every method, VAR included, edits on it.

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
from torch import Tensor, nn

import vlmfix
from vlmfix.decoding.method import Method
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


def llava_shaped(layers: int, heads: int, head_dim: int) -> TinyVLM:
    """Random LLaVA-1.5-shaped model: 576 image tokens (336 px / patch 14), MHA, sized by the arguments."""
    return build_tiny("llava", layers=layers, heads=heads, kv_heads=heads, head_dim=head_dim,
                      image_size=336, patch_size=14)


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
    first = tiny.inputs([PROMPT])["input_ids"][0, 0]  # the chat template's first token ("USER")
    with torch.no_grad():
        tiny.model.get_input_embeddings().weight[first, list(SINK_DIMS)] = MASSIVE
    vlmfix.get_adapter(tiny.model).projector.register_forward_hook(_plant_image_sinks)


def _plant_image_sinks(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Projector output [images, tokens, hidden]: `MASSIVE` in `SINK_DIMS` on the `IMAGE_SINKS` tokens."""
    out = out.clone()
    tokens = [t for t in IMAGE_SINKS if t < out.shape[-2]]
    for dim in SINK_DIMS:
        out[..., tokens, dim] = MASSIVE
    return out


def speed_model(layers: int, heads: int, head_dim: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> TinyVLM:
    """The planted LLaVA-shaped model on `device` in `dtype` (same weights for the same shape)."""
    tiny = llava_shaped(layers, heads, head_dim)
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


def is_two_stream(methods: Sequence[Method]) -> bool:
    """Whether `methods` decode a second stream (contrastive methods; PAI/DualStream with refinement on)."""
    return any(getattr(m, "contrastive", False) for m in methods)
