"""VAR's sink dimensions: the few hidden dimensions where a backbone's "massive activations" live.

A token is a sink in a layer when its layer input x, RMS-normalised, is huge in one of these dimensions:
phi(x) = max_{d in D_sink} |x_d| / sqrt(mean(x^2) + 1e-6) >= tau. The dimensions are a property of the
language model, fixed once per checkpoint (spec var.md, section 5): the published ones are in
`SINK_DIMS`; for any other model run `calibrate_sink_dims` once (rule R2) and pass the result as
`VAR(sink_dims=[...])` (in the benchmark app: the model preset's `var_sink_dims`).

    python -m vlmfix.methods.sink_dims --model /models/qwen2.5-vl-7b --images /data/coco/val2014 --n 20
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.decoding.prompt_inputs import padding_mask, without_loop_keys

RMS_EPS = 1e-6
CALIBRATION_PROMPT = "Describe this image."
CALIBRATE_COMMAND = "python -m vlmfix.methods.sink_dims --model <model dir> --images <image dir>"


@dataclass(frozen=True)
class SinkDims:
    """Published massive-activation dimensions of one backbone, matched by its language-model shape."""

    checkpoint: str
    family: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    dims: tuple[int, ...]
    source: str


SINK_DIMS: tuple[SinkDims, ...] = (
    SinkDims("llava-hf/llava-1.5-7b-hf", "llava", 4096, 32, 11008, (1415, 2533),
             "[P] Sec. 4.1 and the official code's constants (LLaMA-2-7B / Vicuna-7B)"),
    SinkDims("llava-hf/llava-1.5-13b-hf", "llava", 5120, 40, 13824, (2100, 4743),
             "official code's constants only, never exercised there (LLaMA-2-13B / Vicuna-13B)"),
    SinkDims("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 3584, 28, 18944, (458, 2570),
             "[P] App. A.1 (secondary source, no released code) (Qwen2-7B)"),
)


def table_sink_dims(model: nn.Module) -> SinkDims | None:
    """The `SINK_DIMS` entry whose family and language-model shape match `model`, if any."""
    adapter = get_adapter(model)
    config = adapter.text_config
    for entry in SINK_DIMS:
        if (entry.family, entry.hidden_size, entry.num_layers, entry.intermediate_size) == (
            adapter.family, config.hidden_size, adapter.num_layers, getattr(config, "intermediate_size", None)
        ):
            return entry
    return None


def rms_ratio(hidden: Tensor) -> Tensor:
    """|x_d| / rms(x) for every dimension d, in fp32 (no learned weight): [..., hidden] -> [..., hidden]."""
    x = hidden.float()
    return x.abs() / x.square().mean(-1, keepdim=True).add(RMS_EPS).sqrt()


def sink_ratio(hidden: Tensor, dims: Sequence[int]) -> Tensor:
    """phi = max_{d in dims} |x_d| / rms(x) in fp32: [..., hidden] -> [...]."""
    x = hidden.float()
    rms = x.square().mean(-1).add(RMS_EPS).sqrt()
    return x[..., list(dims)].abs().amax(-1) / rms


def first_token_ratios(
    model: nn.Module, inputs: dict[str, Any], forward: Callable[[dict[str, Any]], Any] | None = None
) -> Tensor:
    """[layers 2..L-1, batch, hidden] fp32: |x_d| / rms(x) of each row's first real token (BOS, or Qwen's
    first template token) at the input of layers 2..L-1 (all layers for models of 2 or fewer)."""
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    first = padding_mask(inputs.get("attention_mask"), ids).int().argmax(dim=1)  # [batch] first real position
    layers = range(2, adapter.num_layers) if adapter.num_layers > 2 else range(adapter.num_layers)
    ratios: list[Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
        ratios.append(rms_ratio(hidden[torch.arange(hidden.shape[0]), first]))

    handles = [adapter.input_layernorm(layer).register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        clean = without_loop_keys(inputs)
        if forward is None:
            with torch.no_grad():
                model(**clean)
        else:
            forward(clean)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(ratios)


def find_sink_dims(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    tau: float = 20.0,
    min_share: float = 0.5,
    forward: Callable[[dict[str, Any]], Any] | None = None,
) -> list[int]:
    """Rule R2 on one prompt batch: the dimensions d with |x_d| / rms(x) >= `tau` in more than `min_share`
    of the (layer 2..L-1, row) pairs of each row's first real token. Sorted, 0-based; empty when none
    qualifies (a small random model's ratio cannot exceed sqrt(hidden_size)).

    Example:
        >>> import vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example(images=2)
        >>> dims = find_sink_dims(model, inputs)  # the toy has none at tau=20: []
    """
    ratios = first_token_ratios(model, inputs, forward)
    share = (ratios >= tau).float().flatten(0, 1).mean(0)  # [hidden]
    return (share > min_share).nonzero().flatten().tolist()


@dataclass(frozen=True)
class SinkCalibration:
    """What `calibrate_sink_dims` found: the dimensions, and the strongest candidates with their ratios."""

    dims: tuple[int, ...]
    tau: float
    min_share: float
    prompts: int
    # the top candidates: (dimension, share of (layer, prompt) pairs >= tau, median |x_d| / rms(x))
    candidates: tuple[tuple[int, float, float], ...] = field(default_factory=tuple)

    def describe(self) -> str:
        found = f"sink dims {list(self.dims)}" if self.dims else "no sink dimension"
        lines = [f"{found} at tau={self.tau:g} (share of (layer, prompt) pairs > {self.min_share:g}, "
                 f"{self.prompts} prompts)"]
        lines += [f"  dim {d}: share {s:.2f}, median ratio {r:.1f}" for d, s, r in self.candidates]
        return "\n".join(lines)


def calibrate_sink_dims(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, tau: float = 20.0, min_share: float = 0.5,
    top: int = 5,
) -> SinkCalibration:
    """Rule R2 over ordinary prompts (about 20): the model's sink dimensions, computed once per checkpoint.

    Args:
        model: a supported VLM.
        batches: processor outputs (input_ids, attention_mask, image tensors) of ordinary image prompts.
        tau: the activation threshold (VAR's tau).
        min_share: the share of (layer, prompt) pairs a dimension must exceed `tau` in.
        top: how many strongest candidates to list (by median ratio), for a model where none qualifies.
    """
    ratios = torch.cat([first_token_ratios(model, dict(batch)) for batch in batches], dim=1)  # [layers, n, hidden]
    pairs = ratios.flatten(0, 1)  # [layers * n, hidden]
    share = (pairs >= tau).float().mean(0)
    median = pairs.median(0).values
    dims = tuple((share > min_share).nonzero().flatten().tolist())
    order = median.argsort(descending=True)[:top].tolist()
    candidates = tuple((d, float(share[d]), float(median[d])) for d in order)
    return SinkCalibration(dims, tau, min_share, ratios.shape[1], candidates)


# ---------------------------------------------------------------------------------------------- CLI
def _calibration_batches(processor: Any, images: Sequence[Path], batch_size: int) -> Iterable[dict[str, Any]]:
    from PIL import Image

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CALIBRATION_PROMPT}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    for start in range(0, len(images), batch_size):
        part = images[start : start + batch_size]
        pictures = [Image.open(path).convert("RGB") for path in part]
        yield dict(processor(images=pictures, text=[prompt] * len(part), padding=True, return_tensors="pt"))


def main(argv: Sequence[str] | None = None) -> SinkCalibration:
    parser = argparse.ArgumentParser(description="Find a VLM's sink dimensions for VAR (rule R2), once.")
    parser.add_argument("--model", required=True, help="a local model directory, or 'toy' / 'toy_fast'")
    parser.add_argument("--images", help="a folder of ordinary images (default for the toy: its own)")
    parser.add_argument("--n", type=int, default=20, help="how many images (prompts) to use")
    parser.add_argument("--tau", type=float, default=20.0)
    parser.add_argument("--min-share", type=float, default=0.5)
    args = parser.parse_args(argv)
    image_dir: Path | None
    if args.model in ("toy", "toy_fast"):
        from vlmfix.toy import build_toy

        paths = build_toy(fast=args.model == "toy_fast")
        model_dir, image_dir = Path(paths.model_dir), Path(args.images or Path(paths.data_dir) / "images" / "val")
    else:
        model_dir, image_dir = Path(args.model), Path(args.images) if args.images else None
        if not model_dir.is_dir():
            parser.error(f"--model {args.model}: no such directory (vlmfix loads local checkpoints only)")
        if image_dir is None:
            parser.error("--images is required for a model other than the toy")
    if not image_dir.is_dir():
        parser.error(f"--images {image_dir}: no such directory")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    if not images:
        parser.error(f"--images {image_dir}: no .jpg or .png files")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    found = calibrate_sink_dims(model, _calibration_batches(processor, images, 4), tau=args.tau,
                                min_share=args.min_share)
    print(found.describe())
    if found.dims:
        print(f"use: VAR(sink_dims={list(found.dims)}, tau={args.tau:g}); model preset: "
              f"var_sink_dims: {list(found.dims)}, var_tau: {args.tau:g}")
    return found


if __name__ == "__main__":
    main()
