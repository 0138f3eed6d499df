"""OPERA's per-token decode cost against transformers' plain beam search with the same beam count, as a
ratio measured in one run, per dtype and batch size (the official code pays about 9x greedy: 1 + C forwards
per step).

Both variants run on the speed model of `--family` (benchmarks/speed_setup.py; `--batch` prompts, each
with its own image, left-padded alike) with `--beams` beams, greedy beam search (`do_sample=False`) and a
fixed length (`min_new_tokens = max_new_tokens`):
- beam: `model.generate(**inputs, num_beams=K)`;
- opera: `vlmfix.generate(model, **inputs, methods=[OPERA(...)], num_beams=K)` (the paper's settings
  unless `--opera` sets parameters, e.g. `candidate_pass=sequential`).
Beam search takes no streamer, so the per-token cost (one step of the whole batch) is read from two call
lengths: (time(N new tokens) - time(N0 new tokens)) / (N - N0); prefill, image encoding and the session's
set-up cancel. Calls are interleaved (beam, opera, beam, opera, ...) and medians kept, so a load change on
the machine hits both alike. Beside each figure, OPERA's report of its last call says whether it edited:
steps scored with the over-trust penalty (only after `image_bonus_steps`, 10, so N must exceed it), with
the image bonus, and rollbacks (a rollback re-decodes tokens, which the per-token cost then includes).

    python -m benchmarks.opera_speed --quick      # a smoke run on a tiny model
    python -m benchmarks.opera_speed --device cpu --layers 4 --heads 16 --head-dim 64   # fits 24 GiB of CPU memory
    python -m benchmarks.opera_speed --device cuda --layers 32 --heads 32 --head-dim 128   # a 7B LLaVA (the default)
    python -m benchmarks.opera_speed --dtype bfloat16 --batch 8 --opera num_attn_candidates=2,threshold=20  # issue #3

The default shape (32 x 32 x 128) in float32 does not fit in 24 GiB of CPU memory; use a GPU or the
4 x 16 x 64 shape there. Exits with status 1 when a block's ratio is above `--max-ratio` (1.5).
A family that refuses OPERA (Gemma 3's sliding-window layers) is reported as refused, with the
reason, and nothing is timed.
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
from vlmfix.testing import TinyVLM

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


def run_block(args: argparse.Namespace, tiny: TinyVLM, opera: vlmfix.OPERA, dtype: str, batch: int) -> dict[str, Any]:
    """Beam search and OPERA on `batch` prompts in `dtype`, timed interleaved; the figures and OPERA's last
    report (the long call's: whether it penalised and rolled back, per item)."""
    inputs = batch_inputs(tiny, batch, args.device, DTYPES[dtype])
    fixed = dict(num_beams=args.beams, do_sample=False)
    reports: list[dict[str, Any]] = []

    def beam(n: int) -> None:
        tiny.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **fixed)

    def with_opera(n: int) -> None:
        with vlmfix.apply(tiny.model, opera) as session:
            session.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **fixed)
        reports.append(session.report()["opera"])

    beam(args.short_tokens)  # warm-up: lazy imports, allocator
    with_opera(args.short_tokens)
    seconds = per_token_seconds({"beam": beam, "opera": with_opera}, args.short_tokens, args.new_tokens, args.repeats)
    last = reports[-1]  # a long call (the last one timed)
    beam_s, opera_s = seconds["beam"], seconds["opera"]
    return {"dtype": dtype, "batch": batch, "beam_ms_per_token": 1000 * beam_s, "opera_ms_per_token": 1000 * opera_s,
            "ratio": opera_s / beam_s, "penalised": sum(last["penalty_steps"]) > 0,
            "rolled_back": sum(last["rollbacks"]) > 0, "opera_report_last_call": last}


def table(rows: Sequence[dict[str, Any]], beams: int) -> str:
    """The blocks as a markdown table; per-token figures are one step of the whole batch (every row a token)."""
    lines = [f"| dtype | batch | beam search ({beams} beams) ms/token | OPERA ms/token | OPERA / beam "
             "| penalised steps | bonus steps | rollbacks |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        report = r["opera_report_last_call"]
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['beam_ms_per_token']:.2f} | {r['opera_ms_per_token']:.2f} "
                     f"| {r['ratio']:.3f}x | {report['penalty_steps']} | {report['bonus_steps']} "
                     f"| {report['rollbacks']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _, params = parse_method(f"opera:{args.opera}" if args.opera else "opera")
    opera = vlmfix.OPERA(**params)
    print(f"{args.family}-shaped model: {args.layers} layers x {args.heads} heads x head_dim {args.head_dim} "
          f"on {args.device}, {args.beams} beams, per-token cost from calls of {args.short_tokens} and "
          f"{args.new_tokens} new tokens, {args.repeats} repeats; {opera!r}")
    rows = []
    for dtype in args.dtype:
        tiny = speed_model(args.layers, args.heads, args.head_dim, args.device, DTYPES[dtype], family=args.family,
                           kv_heads=args.kv_heads)
        refused = refusal(tiny, [opera])
        if refused is not None:
            print(f"OPERA refused by {args.family}: {refused}")
            return {"refused": refused, "settings": vars(args)}
        for batch in args.batch:
            row = run_block(args, tiny, opera, dtype, batch)
            report = row["opera_report_last_call"]
            print(f"{dtype}, batch {batch}: beam search {row['beam_ms_per_token']:.2f} ms/token, OPERA "
                  f"{row['opera_ms_per_token']:.2f} ms/token: {row['ratio']:.3f}x (target <= {args.max_ratio}x); "
                  f"OPERA's last call: penalised steps {report['penalty_steps']}, bonus steps {report['bonus_steps']}, "
                  f"rollbacks {report['rollbacks']}")
            if not row["penalised"]:
                print("  OPERA scored every step with the image bonus (no over-trust penalty): use --new-tokens "
                      "above image_bonus_steps (10) for a figure of the penalty")
            rows.append(row)
        del tiny
    print("\n" + table(rows, args.beams))
    result = {"rows": rows, "max_ratio": args.max_ratio, "settings": vars(args)}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--family", default="llava", choices=SPEED_FAMILIES)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: the family's grouping")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="prompts per generate call")
    parser.add_argument("--beams", type=int, default=5, help="the paper's 5")
    parser.add_argument("--new-tokens", type=int, default=64, help="the long call's new tokens (N)")
    parser.add_argument("--short-tokens", type=int, default=None,
                        help="the short call's new tokens (N0; default N // 4, at least 1)")
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
    if args.short_tokens is None:
        args.short_tokens = max(1, args.new_tokens // 4)
    if not 1 <= args.short_tokens < args.new_tokens:
        parser.error("need 1 <= --short-tokens < --new-tokens (the per-token cost is their difference)")
    if args.beams < 2 or min(args.batch) < 1 or args.repeats < 1:
        parser.error("--beams must be at least 2, --batch and --repeats at least 1")
    return args


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if "refused" in outcome or all(r["ratio"] <= outcome["max_ratio"] for r in outcome["rows"]) else 1)
