"""Per-token decode time of vlmfix against plain `model.generate`, as ratios measured in one run.

Decode time per token is read from a streamer's timestamps: (time of token N - time of token 1) /
(N - 1), so prefill and the methods' prepare passes are excluded. Variants are timed interleaved
(A B C A B C ...) and the median is kept, so a load change on the machine hits every variant alike.

    python -m benchmarks.speed                      # LLaVA-shaped CPU model, the core figures
    python -m benchmarks.speed --layers 4 --new-tokens 16 --repeats 2   # a quick look
    python -m benchmarks.speed --methods vhr var     # registered methods, default parameters
    python -m benchmarks.speed --methods pai:cfg=False gift   # name:key=value,... sets parameters
    python -m benchmarks.speed --methods vcd dcd pai # two-stream methods also get the 2-row floor
    python -m benchmarks.speed --device cuda --dtype bfloat16 --methods vcd dcd pai gift

A two-stream method (VCD, DCD, PAI with refinement) decodes 2 rows per prompt; the harness then also
times plain `generate` on the prompt duplicated to 2 rows, the floor of any batched two-stream
decoder on this machine. DCD is timed with stand-in projectors (copies of the model's own, written as
DCD checkpoints to a temporary directory): its cost does not depend on the trained weights.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

import vlmfix
from vlmfix.decoding.edits import Edit, KeyBias
from vlmfix.decoding.method import Method
from vlmfix.methods.dcd import CHECKPOINT_FILES, save_projector
from vlmfix.testing import TinyVLM, build_tiny

# A variant runs generation of `n` new tokens (batch 1) reporting each token to `streamer`.
GenerateFn = Callable[[int, BaseStreamer], Any]


class TokenClock(BaseStreamer):
    """Records when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        # generate hands streamers CPU copies of the tokens, so on a GPU the step has finished here
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
    """Seconds per decode token of each variant (the first one is the baseline of the ratios).

    A variant other than the baseline that fails its warm-up is reported and left out, so one broken
    method does not cost a whole (GPU) run."""
    variants = dict(variants)
    for label, fn in list(variants.items()):  # warm-up: allocations, lazy imports
        try:
            timed(fn, 3)
        except Exception as error:
            if label == next(iter(variants)):
                raise
            progress(f"  {label}: failed, left out: {type(error).__name__}: {error}")
            del variants[label]
    samples: dict[str, list[float]] = {label: [] for label in variants}
    for r in range(repeats):
        for label, fn in variants.items():
            samples[label].append(timed(fn, new_tokens))
        progress(f"  repeat {r + 1}/{repeats} done")
    medians = {label: statistics.median(s) for label, s in samples.items()}
    base = next(iter(medians.values()))
    return [SpeedResult(label, sec, sec / base) for label, sec in medians.items()]


def generate_variants(tiny: TinyVLM, inputs: dict, methods: dict[str, Sequence[Method]],
                      two_row_floor: bool = False) -> dict[str, GenerateFn]:
    """`greedy` (plain `model.generate`), optionally `greedy, 2 rows` (the prompt duplicated: the floor of a
    two-stream decoder), then one variant per method list; all greedy, fixed length."""
    model = tiny.model
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}  # batch 1 -> 2 rows

    def plain(n: int, streamer: BaseStreamer) -> Any:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)

    def plain_two_rows(n: int, streamer: BaseStreamer) -> Any:
        return model.generate(**doubled, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              streamer=_FirstRow(streamer))

    def with_methods(ms: Sequence[Method]) -> GenerateFn:
        return lambda n, streamer: vlmfix.generate(
            model, **inputs, methods=list(ms), tokenizer=tiny.processor, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, streamer=streamer,
        )

    floor = {"greedy, 2 rows (two-stream floor)": plain_two_rows} if two_row_floor else {}
    return {"greedy": plain, **floor, **{label: with_methods(ms) for label, ms in methods.items()}}


class _FirstRow(BaseStreamer):
    """Passes a 2-row batch's token events on to a streamer that expects one row."""

    def __init__(self, inner: BaseStreamer) -> None:
        self.inner = inner

    def put(self, value: torch.Tensor) -> None:
        self.inner.put(value[:1])

    def end(self) -> None:
        self.inner.end()


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


def stand_in_dcd(tiny: TinyVLM, directory: str, **kwargs: Any) -> Method:
    """DCD over copies of the model's own projector saved as its checkpoints (timing only)."""
    state = {name: t.clone() for name, t in vlmfix.get_adapter(tiny.model).projector.state_dict().items()}
    for stream, file in CHECKPOINT_FILES.items():
        save_projector(f"{directory}/{file}", state, tiny.model, stream)
    return vlmfix.DCD(directory, **kwargs)


def is_two_stream(method: Method) -> bool:
    """Whether `method` decodes a second stream (contrastive methods; PAI with its refinement on)."""
    return bool(getattr(method, "contrastive", False))


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


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
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--methods", nargs="*", default=[],
                        help="registered methods to time, as name or name:key=value,... (e.g. pai:cfg=False); "
                             "default: the core's no-method and edit figures")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tiny = llava_shaped(args.layers, args.heads, args.head_dim)
    dtype = DTYPES[args.dtype]
    tiny.model.to(device=args.device, dtype=dtype)
    inputs = {key: value.to(args.device, dtype=dtype if value.is_floating_point() else value.dtype)
              for key, value in tiny.inputs(["describe this image ."]).items()}
    half = list(range(0, args.layers, 2))
    print(f"LLaVA-shaped model: {args.layers} layers x {args.heads} heads x head_dim {args.head_dim}, "
          f"{int(inputs['input_ids'].eq(tiny.model.config.image_token_id).sum())} image tokens, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats, {args.dtype} on {device_name(args.device)}")
    with tempfile.TemporaryDirectory() as stand_in_dir:  # DCD reads its stand-in checkpoints when it runs
        if args.methods:
            methods = {}
            for spec in args.methods:
                name, kwargs = parse_method(spec)
                methods[spec] = [stand_in_dcd(tiny, stand_in_dir, **kwargs) if name == "dcd"
                                 else method_by_name(name, **kwargs)]
        else:
            methods = {
                "vlmfix, no method": [],
                f"vlmfix, edit on {len(half)}/{args.layers} layers": [ImageBiasOnLayers(half)],
            }
        two_stream = any(is_two_stream(m) for ms in methods.values() for m in ms)
        variants = generate_variants(tiny, inputs, methods, two_row_floor=two_stream)
        results = measure(variants, args.new_tokens, args.repeats)
    print("\n| variant | ms / decode token | ratio to greedy |\n|---|---|---|")
    for r in results:
        print(f"| {r.label} | {1000 * r.seconds_per_token:.2f} | {r.ratio:.3f}x |")
    return results


if __name__ == "__main__":
    main()
