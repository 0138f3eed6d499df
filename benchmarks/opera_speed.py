"""OPERA's per-token decode cost against transformers' plain beam search with the same beam count, as a
ratio measured in one run (the official code pays about 9x greedy: 1 + C forwards per step).

Both variants run on the speed model of `--family` (benchmarks/speed_setup.py) with `--beams` beams, greedy
beam search (`do_sample=False`) and a fixed length (`min_new_tokens = max_new_tokens`):
- beam: `model.generate(**inputs, num_beams=K)`;
- opera: `vlmfix.generate(model, **inputs, methods=[OPERA(...)], num_beams=K)` (the paper's settings
  unless `--opera` sets parameters).
Beam search takes no streamer, so the per-token cost is read from two call lengths:
(time(N new tokens) - time(N0 new tokens)) / (N - N0); prefill, image encoding and the session's set-up
cancel. Calls are interleaved (beam, opera, beam, opera, ...) and medians kept, so a load change on the
machine hits both alike. OPERA's report (penalised steps, rollbacks) is printed beside the figures: a
rollback re-decodes tokens, which the per-token cost then includes.

    python -m benchmarks.opera_speed --quick      # a smoke run on a tiny model
    python -m benchmarks.opera_speed --device cuda --dtype bfloat16 --layers 32 --heads 32 --head-dim 128
    python -m benchmarks.opera_speed --opera num_attn_candidates=2,threshold=20   # the issue-#3 speed preset

Exits with status 1 when the ratio is above `--max-ratio` (1.5). A family that refuses OPERA (Gemma 3's
sliding-window layers) is reported as refused, with the reason, and nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import vlmfix
from benchmarks.speed_setup import DTYPES, SPEED_FAMILIES, batch_inputs, parse_method, refusal, speed_model
from benchmarks.speed_timing import synchronize

QUICK = dict(layers=2, heads=4, head_dim=16, new_tokens=14, short_tokens=4, repeats=1)


def per_token_seconds(variants: dict[str, Callable[[int], Any]], short: int, long: int,
                      repeats: int) -> dict[str, float]:
    """Median per-token seconds of each variant, from calls of `short` and `long` new tokens, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            spans = []
            for n in (short, long):
                start = time.perf_counter()
                call(n)
                synchronize()
                spans.append(time.perf_counter() - start)
            times[name].append((spans[1] - spans[0]) / (long - short))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tiny = speed_model(args.layers, args.heads, args.head_dim, args.device, DTYPES[args.dtype], family=args.family,
                       kv_heads=args.kv_heads)
    inputs = batch_inputs(tiny, args.batch, args.device, DTYPES[args.dtype])
    _, params = parse_method(f"opera:{args.opera}" if args.opera else "opera")
    opera = vlmfix.OPERA(**params)
    refused = refusal(tiny, [opera])
    if refused is not None:
        print(f"OPERA refused by {args.family}: {refused}")
        return {"refused": refused, "settings": vars(args)}
    fixed = dict(num_beams=args.beams, do_sample=False)
    reports: list[dict[str, Any]] = []

    def beam(n: int) -> None:
        tiny.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **fixed)

    def with_opera(n: int) -> None:
        with vlmfix.apply(tiny.model, opera) as session:
            session.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **fixed)
        reports.append(session.report()["opera"])

    print(f"{args.family}-shaped model: {args.layers} layers x {args.heads} heads x head_dim {args.head_dim}, "
          f"{args.dtype} on {args.device}, batch {args.batch}, {args.beams} beams; {opera!r}")
    beam(args.short_tokens)  # warm-up: lazy imports, allocator
    with_opera(args.short_tokens)
    reports.clear()
    seconds = per_token_seconds({"beam": beam, "opera": with_opera}, args.short_tokens, args.new_tokens, args.repeats)
    beam_s, opera_s = seconds["beam"], seconds["opera"]
    ratio = opera_s / beam_s
    last = reports[-1]
    result = {"beam_ms_per_token": 1000 * beam_s, "opera_ms_per_token": 1000 * opera_s, "ratio": ratio,
              "max_ratio": args.max_ratio, "opera_report_last_call": last, "settings": vars(args)}
    print(f"beam search ({args.beams} beams): {1000 * beam_s:.2f} ms/token")
    print(f"OPERA        ({args.beams} beams): {1000 * opera_s:.2f} ms/token")
    print(f"ratio OPERA / beam: {ratio:.3f}x (target <= {args.max_ratio}x)")
    print(f"OPERA, last call: penalised steps {last['penalty_steps']}, bonus steps {last['bonus_steps']}, "
          f"rollbacks {last['rollbacks']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=list(DTYPES))
    parser.add_argument("--family", default="llava", choices=SPEED_FAMILIES)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: the family's grouping")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=5, help="the paper's 5")
    parser.add_argument("--new-tokens", type=int, default=64, help="the long call's new tokens (N)")
    parser.add_argument("--short-tokens", type=int, default=16, help="the short call's new tokens (N0)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opera", default="", help="OPERA parameters as key=value,... (e.g. threshold=20)")
    parser.add_argument("--max-ratio", type=float, default=1.5)
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    if args.quick:  # QUICK's settings as defaults: options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if not 1 <= args.short_tokens < args.new_tokens:
        parser.error("need 1 <= --short-tokens < --new-tokens (the per-token cost is their difference)")
    if args.beams < 2 or args.batch < 1 or args.repeats < 1:
        parser.error("--beams must be at least 2, --batch and --repeats at least 1")
    return args


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if "refused" in outcome or outcome["ratio"] <= outcome["max_ratio"] else 1)
