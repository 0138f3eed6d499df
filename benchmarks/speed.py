"""Per-token decode time of vlmfix against plain `model.generate`, as ratios measured in one run.

Decode time per token is read from a streamer's timestamps: (time of token N - time of token 1) /
(N - 1), so prefill and the methods' prepare passes are excluded. Variants are timed interleaved
(A B C A B C ...) and the median is kept, so a load change on the machine hits every variant alike.

    python -m benchmarks.speed                      # LLaVA-shaped CPU model, the core figures
    python -m benchmarks.speed --layers 4 --new-tokens 16 --repeats 2   # a quick look
    python -m benchmarks.speed --methods vhr var     # registered methods, default parameters
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

import vlmfix
from vlmfix.decoding.edits import Edit, KeyBias
from vlmfix.decoding.method import Method
from vlmfix.testing import TinyVLM, build_tiny

# A variant runs generation of `n` new tokens (batch 1) reporting each token to `streamer`.
GenerateFn = Callable[[int, BaseStreamer], Any]


class TokenClock(BaseStreamer):
    """Records when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def seconds_per_decode_token(self) -> float:
        if len(self.times) < 2:
            raise RuntimeError("need at least 2 generated tokens to time decoding")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


@dataclass(frozen=True)
class SpeedResult:
    label: str
    seconds_per_token: float
    ratio: float  # to the baseline (the first variant)


def timed(fn: GenerateFn, new_tokens: int) -> float:
    clock = TokenClock()
    fn(new_tokens, clock)
    return clock.seconds_per_decode_token()


def measure(variants: dict[str, GenerateFn], new_tokens: int, repeats: int,
            progress: Callable[[str], None] = print) -> list[SpeedResult]:
    """Seconds per decode token of each variant (the first one is the baseline of the ratios)."""
    for fn in variants.values():  # warm-up: allocations, lazy imports
        timed(fn, 3)
    samples: dict[str, list[float]] = {label: [] for label in variants}
    for r in range(repeats):
        for label, fn in variants.items():
            samples[label].append(timed(fn, new_tokens))
        progress(f"  repeat {r + 1}/{repeats} done")
    medians = {label: statistics.median(s) for label, s in samples.items()}
    base = next(iter(medians.values()))
    return [SpeedResult(label, sec, sec / base) for label, sec in medians.items()]


def generate_variants(tiny: TinyVLM, inputs: dict, methods: dict[str, Sequence[Method]]) -> dict[str, GenerateFn]:
    """`greedy` (plain `model.generate`) then one variant per method list, all greedy, fixed length."""
    model = tiny.model

    def plain(n: int, streamer: BaseStreamer) -> Any:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)

    def with_methods(ms: Sequence[Method]) -> GenerateFn:
        return lambda n, streamer: vlmfix.generate(
            model, **inputs, methods=list(ms), tokenizer=tiny.processor, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, streamer=streamer,
        )

    return {"greedy": plain, **{label: with_methods(ms) for label, ms in methods.items()}}


class ImageBiasOnLayers(Method):
    """A stand-in edit for the harness: PAI-style bias on image keys, last row, on chosen layers."""

    name = "speed-image-bias"
    needs_image = True

    def __init__(self, layers: Sequence[int], gain: float = 0.2) -> None:
        self.layers, self.gain = tuple(layers), gain

    def prepare(self, session: vlmfix.Session) -> Any:
        return KeyBias(abs_gain=session.spans.image[:, None].float() * self.gain, rows="last")

    def edits(self, state: Any, layer_idx: int) -> Sequence[Edit]:
        return (state,) if layer_idx in self.layers else ()


def method_by_name(name: str) -> Method:
    """A registered method with default parameters (importing its module if vlmfix has not yet)."""
    if name not in vlmfix.methods.names():
        try:
            importlib.import_module(f"vlmfix.decoding.{name}")
        except ModuleNotFoundError:
            pass
    return vlmfix.methods.create(name)


def llava_shaped(layers: int, heads: int, head_dim: int) -> TinyVLM:
    """Random LLaVA-1.5-shaped model: 576 image tokens (336 px / patch 14), MHA, sized by the arguments."""
    return build_tiny("llava", layers=layers, heads=heads, kv_heads=heads, head_dim=head_dim,
                      image_size=336, patch_size=14)


def main(argv: Sequence[str] | None = None) -> list[SpeedResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=[],
                        help="registered method names to time (default: the core's no-method and edit figures)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tiny = llava_shaped(args.layers, args.heads, args.head_dim)
    inputs = tiny.inputs(["describe this image ."])
    half = list(range(0, args.layers, 2))
    print(f"LLaVA-shaped CPU model: {args.layers} layers x {args.heads} heads x head_dim {args.head_dim}, "
          f"{int(inputs['input_ids'].eq(tiny.model.config.image_token_id).sum())} image tokens, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, {args.repeats} repeats")
    if args.methods:
        methods = {name: [method_by_name(name)] for name in args.methods}
    else:
        methods = {
            "vlmfix, no method": [],
            f"vlmfix, edit on {len(half)}/{args.layers} layers": [ImageBiasOnLayers(half)],
        }
    variants = generate_variants(tiny, inputs, methods)
    results = measure(variants, args.new_tokens, args.repeats)
    print("\n| variant | ms / decode token | ratio to greedy |\n|---|---|---|")
    for r in results:
        print(f"| {r.label} | {1000 * r.seconds_per_token:.2f} | {r.ratio:.3f}x |")
    return results


if __name__ == "__main__":
    main()
