"""What the lmms-eval plugin reads from `--model_args` and from a task's `generation_kwargs`, without lmms-eval.

Kept apart from `vlmfix.integrations.lmms_eval` (which subclasses lmms-eval's model class) so it is usable and
testable where lmms-eval is not installed:

- `parse_methods("var;pai:alpha=0.5")`: the methods of a `methods=` model argument;
- `methods_from_config(path)`: the methods of a YAML file of Hydra method nodes (`_target_` + arguments);
- `load_vlm(...)`: the model and processor, from a local checkpoint or the toy (never downloads by default);
- `generation_settings(gen_kwargs)`: a task's generation kwargs as `generate` keywords, and its stop strings;
- `cut_at_stops(text, stops)`: a generated text up to its first stop string.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vlmfix
from vlmfix.decoding.method import Method
from vlmfix.validation import boolean, choice, number, optional_number, text

DTYPES = ("float32", "float16", "bfloat16")
TOYS = ("toy", "toy_fast")
METHOD_SEPARATORS = re.compile(r"[;+]")  # commas separate lmms-eval's own model arguments
OPTION_SEPARATOR = ":"
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's built-in models' default when a task sets none
HANDLED_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample")


def parse_methods(spec: str | None) -> list[Method]:
    """The methods of `spec`: method names joined by `;` or `+`, each optionally followed by `:key=value` options
    (values read as Python literals, else kept as text), e.g. `var;pai:alpha=0.5:cfg=False`. Empty: no method.

    >>> parse_methods("pai:alpha=0.5:cfg=False")
    [PAI(alpha=0.5, layers=None, cfg=False, ...)]
    """
    if spec is None:
        return []
    text(spec, "methods", allow_empty=True, meaning="method names joined by ';', e.g. var;pai:alpha=0.5")
    methods = []
    for part in filter(None, (p.strip() for p in METHOD_SEPARATORS.split(spec))):
        name, *options = part.split(OPTION_SEPARATOR)
        kwargs: dict[str, Any] = {}
        for option in options:
            key, eq, raw = option.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method option {option!r} in methods={spec!r} is not key=value; write options as "
                                 "name:key=value:key=value, e.g. pai:alpha=0.5:cfg=False.")
            kwargs[key.strip()] = _literal(raw.strip())
        methods.append(vlmfix.methods.create(name.strip(), **kwargs))
    return methods


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def methods_from_config(path: str | Path) -> list[Method]:
    """The methods of a YAML file holding one Hydra method node or a list of them (`_target_: vlmfix.VAR` plus
    constructor arguments, as in `conf/method/*.yaml`). Interpolations (`${...}`) are not resolved here: a node
    that holds one is refused, naming the key, so write the value itself."""
    import yaml

    if not isinstance(path, Path):
        text(path, "methods_config", meaning="a YAML file of method nodes")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"`methods_config` {str(file)!r} does not exist; point it at a YAML file of method "
                                "nodes, e.g. one holding `{_target_: vlmfix.VAR, p: 0.6}`.")
    loaded = yaml.safe_load(file.read_text())
    nodes = loaded if isinstance(loaded, list) else [loaded]
    return [_method_of_node(node, f"{file}[{i}]") for i, node in enumerate(nodes)]


def _method_of_node(node: Any, where: str) -> Method:
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise ValueError(f"{where} must be a method node with a _target_, e.g. {{_target_: vlmfix.VAR}}, got {node!r}.")
    kwargs = {key: value for key, value in node.items() if not key.startswith("_")}
    for key, value in kwargs.items():
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"{where}.{key} is an interpolation ({value!r}) that only the Hydra app resolves; "
                             f"write the value itself (e.g. {key}: null).")
    module_name, _, class_name = node["_target_"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{where}._target_ {node['_target_']!r} cannot be imported; name a method class, e.g. "
                         f"vlmfix.VHR (methods: {', '.join(vlmfix.methods.names())}).") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"{where}._target_ {node['_target_']!r} is not a vlmfix method class; name one, e.g. "
                         "vlmfix.VHR.")
    return cls(**kwargs)


def resolve_device(device: str | None) -> torch.device:
    """`auto`/None: cuda when available, else cpu; otherwise a torch device that exists here."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text(device, "device", meaning="auto, cpu, cuda or cuda:<index>")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` must be auto or a torch device such as cpu, cuda or cuda:1, got "
                         f"{device!r}.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but no CUDA device is available; pass device=cpu (lmms-eval: "
                         "--device cpu).")
    return resolved


def load_vlm(pretrained: str, dtype: str | None = None, attn_implementation: str = "sdpa",
             device: str | None = None, local_files_only: bool = True,
             trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor) on `device`, in eval mode, the processor padding on the left.

    `pretrained`: a checkpoint directory or a hub id in the local hub cache; `toy` / `toy_fast` build (or reuse)
    vlmfix's toy VLM. `dtype` None: float32 for the toy (as the benchmark app loads it), bfloat16 otherwise.
    Nothing is downloaded unless `local_files_only=False`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    text(pretrained, "pretrained", meaning="a checkpoint directory, a hub id in the local cache, toy or toy_fast")
    if dtype is not None:
        choice(dtype, "dtype", DTYPES)
    text(attn_implementation, "attn_implementation", meaning="e.g. sdpa, eager or flash_attention_2")
    boolean(local_files_only, "local_files_only")
    boolean(trust_remote_code, "trust_remote_code")
    target = resolve_device(device)
    if pretrained in TOYS:
        from vlmfix.toy import build_toy

        path: str = str(build_toy(fast=pretrained == "toy_fast", progress=False).model_dir)
        dtype = dtype or "float32"
    else:
        path, dtype = pretrained, dtype or "bfloat16"
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
            local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                  trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(f"Cannot load pretrained={pretrained!r} from local files ({err}); pass a checkpoint "
                                "directory, or put the model in the local hub cache (nothing is downloaded unless "
                                "local_files_only=False).") from err
    processor.tokenizer.padding_side = "left"
    return model.to(target).eval(), processor  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides self


@dataclass(frozen=True)
class GenerationSettings:
    """One group of requests' decoding: the `generate` keywords, the stop strings, and the task keys ignored."""

    kwargs: dict[str, Any]
    stops: tuple[str, ...]
    ignored: tuple[str, ...]


def generation_settings(gen_kwargs: dict[str, Any]) -> GenerationSettings:
    """A task's `generation_kwargs` as `generate` keywords. lmms-eval's convention: temperature 0 is greedy;
    sampling when `do_sample` is true (or, when the task leaves it out, when temperature > 0). When sampling,
    `top_k` is passed as the app passes `decoding.top_k` (0: no cut; left out: transformers' default, 50). `until`
    becomes the stop strings (cut after decoding); keys that are not decoding settings are returned as ignored."""
    max_new_tokens = number(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), "max_new_tokens", low=1,
                            integer=True, meaning="the task's generation budget")
    num_beams = number(gen_kwargs.get("num_beams") or 1, "num_beams", low=1, integer=True)
    temperature = number(gen_kwargs.get("temperature") or 0.0, "temperature", low=0)
    do_sample = gen_kwargs.get("do_sample")
    sample = (temperature > 0) if do_sample is None else (boolean(do_sample, "do_sample") and temperature > 0)
    top_k = optional_number(gen_kwargs.get("top_k"), "top_k", low=0, integer=True,
                            meaning="the task's top-k cut when sampling (0: none)")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": sample}
    if sample:
        top_p = gen_kwargs.get("top_p")
        kwargs.update(temperature=temperature, top_p=1.0 if top_p is None else number(top_p, "top_p", low=0,
                                                                                          high=1, low_open=True))
        if top_k is not None:
            kwargs["top_k"] = top_k
    until = gen_kwargs.get("until") or []
    stops = (until,) if isinstance(until, str) else tuple(until)
    for stop in stops:
        text(stop, "until", allow_empty=True, meaning="the task's stop strings")
    ignored = tuple(sorted(key for key in gen_kwargs if key not in HANDLED_KEYS))
    return GenerationSettings(kwargs, stops, ignored)


def cut_at_stops(generated: str, stops: tuple[str, ...]) -> str:
    """`generated` up to its first stop string (the whole text when none occurs), stripped like the app's."""
    cut = min((i for i in (generated.find(stop) for stop in stops if stop) if i >= 0), default=len(generated))
    return generated[:cut].strip()
