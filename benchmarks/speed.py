"""What vlmfix's methods cost against plain greedy `model.generate`, as ratios measured in one run.

Per block (dtype x batch), every variant is one `generate` call of `--new-tokens` new tokens for `--batch`
prompts (each with its own image) on a random model shaped like LLaVA-1.5, Qwen3-VL or Gemma 3 (`--family`) with
planted massive activations (benchmarks/speed_setup.py), so that every method, VAR included, edits. Figures per
variant:
- decode ms/token: one decode step (a token for each row), from a streamer's timestamps, without prefill
  and prepare passes (the figure earlier versions reported alone);
- fastest run ms/token: decode ms/token of the variant's least-loaded run (the minimum over repeats, as
  `timeit` reports); load from other processes only adds time, so on a shared or small machine (where the
  medians move 10-20% run to run) it is moved least;
- wall s/caption: the whole call (session, prepare passes, prefill, decode) divided by the batch size:
  what a user pays per caption of N tokens;
- peak MB: memory one call adds at its peak (the whole batch), measured once per variant after the timing:
  on CPU the resident-set growth in a fresh process per variant, on CUDA the allocated tensors
  (`torch.cuda.max_memory_allocated`), see benchmarks/speed_memory.py;
- edited: whether every method of the variant edited (`session.report()[name]["applied"]`); a variant whose
  method edits nothing fails, with the reason, and gets no figure; a method the family refuses (its
  `UnsupportedModelError`, e.g. SID on Gemma 3's sliding-window layers) is listed as refused, with the reason,
  and is no failure.
Ratios are to greedy in the same block. Two clocks (`--clock`):
- runs (the default): variants are timed interleaved (A B C, B C A, ...) and medians (and the fastest run) are
  kept, so load changes hit every variant alike; it reads all of the figures above;
- lockstep: every variant runs in its own thread on its own copy of the model, and the variants take turns token
  by token (only one computes at any moment); each decode step is divided by greedy's step of the same index,
  timed milliseconds apart under the same load (benchmarks/speed_lockstep.py). Per variant: the median of these
  paired ratios and their interquartile range, the ratio of the summed steps and the mean decode step (ms/token).
  It reads no wall time nor fastest run (the turns interleave the calls); peak memory is measured as with runs
  (skip it with --no-memory). Meant for a shared machine, where whole runs move 10-30% with other tenants'
  load; with the model copies no variant finds its weights in cache from its own previous step, so its figures
  can differ from the runs clock's on a model that fits in cache.
With a two-stream method in the list (VCD, DCD, PAI and DualStream with refinement) the block also times the
two-stream floor: plain `generate` on the batch stacked twice (2 identical rows per prompt), the floor of any
batched two-stream decoder. DCD runs with stand-in projectors (copies of the model's own): its cost does not
depend on the trained weights.

    python -m benchmarks.speed                    # the full run: every method, fp32 and bf16, batch 1 and 8
    python -m benchmarks.speed --quick            # a smoke run of the whole pipeline on a tiny model
    python -m benchmarks.speed --dtype bfloat16 --batch 8 --methods vhr var    # a part of the full run
    python -m benchmarks.speed --methods pai:cfg=False gift   # name:key=value,... sets parameters; none: no method
    python -m benchmarks.speed --clock lockstep --family gemma3 --methods none vhr pai:cfg=False pai --no-memory
    python -m benchmarks.speed --device cuda --dtype bfloat16 --head-dim 128 --out speed.json
    python -m benchmarks.speed --family qwen3_vl --device cuda --dtype bfloat16 --out speed-qwen3_vl.json

Exits with status 1 when any variant failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import vlmfix
from benchmarks.speed_lockstep import LockstepResult, copied_variants, measure_lockstep
from benchmarks.speed_memory import MemoryJob, measure_memory, peak_growth
from benchmarks.speed_setup import (
    BEAM_SEARCH_METHODS,
    DTYPES,
    FULL_RUN,
    IMAGE_TOKENS,
    NO_METHOD,
    SINK_DIMS,
    SPEED_FAMILIES,
    batch_inputs,
    build_methods,
    is_two_stream,
    kv_heads_of,
    llava_shaped,
    parse_method,
    refusal,
    sink_tau,
    speed_model,
    stand_in_dcd,
)
from benchmarks.speed_timing import (
    FLOOR,
    GREEDY,
    GenerateFn,
    SpeedResult,
    TokenClock,
    generate_variants,
    measure,
)
from vlmfix.testing import TinyVLM

__all__ = ["FLOOR", "GREEDY", "Row", "SpeedResult", "TinyVLM", "TokenClock", "build_variants", "generate_variants",
           "is_two_stream", "llava_shaped", "main", "measure", "parse_method", "stand_in_dcd"]

QUICK = dict(layers=4, heads=4, head_dim=16, new_tokens=4, repeats=1)
CLOCKS = ("runs", "lockstep")


@dataclass(frozen=True)
class Row:
    """One variant of one block, as printed and written. The runs clock fills the decode, fastest-run and wall
    figures; the lockstep clock fills `decode_ms_per_token` (its mean decode step) and the paired figures, and
    leaves the others NaN."""

    variant: str
    dtype: str
    batch: int
    decode_ms_per_token: float
    decode_ratio: float
    fastest_run_ms: float
    fastest_run_ratio: float
    wall_s_per_caption: float
    wall_ratio: float
    peak_mb: float | None
    memory_ratio: float | None
    edited: bool | None  # None: no method to edit (greedy, the floor, vlmfix with no method)
    failure: str | None = None
    refused: str | None = None  # why the model's family refuses the method (not timed; not a failure)
    clock: str = "runs"
    paired_ratio: float = math.nan  # lockstep: median of step / greedy's step of the same index and round
    paired_ratio_q1: float = math.nan  # its 25th percentile
    paired_ratio_q3: float = math.nan  # its 75th percentile
    summed_ratio: float = math.nan  # lockstep: summed decode steps / greedy's


def label_of(spec: str) -> str:
    return "vlmfix, no method" if spec == NO_METHOD else spec


def build_variants(tiny: TinyVLM, inputs: dict, specs: Sequence[str], stand_in_dir: str) -> dict[str, GenerateFn]:
    """Greedy, the two-stream floor when a spec is two-stream, then one variant per method spec."""
    methods = {label_of(spec): build_methods(spec, tiny, stand_in_dir) for spec in specs}
    two_stream = any(is_two_stream(ms) for ms in methods.values())
    return generate_variants(tiny, inputs, methods, two_row_floor=two_stream)


def refused_specs(tiny: TinyVLM, specs: Sequence[str], stand_in_dir: str) -> dict[str, str]:
    """{label: reason} of the specs whose methods the model's family refuses."""
    found = {label_of(spec): refusal(tiny, build_methods(spec, tiny, stand_in_dir)) for spec in specs}
    return {label: reason for label, reason in found.items() if reason is not None}


def run_block(args: argparse.Namespace, tiny: TinyVLM, dtype: str, batch: int) -> list[Row]:
    """Time every variant on `batch` prompts in `dtype`, then measure each one's peak memory."""
    inputs = batch_inputs(tiny, batch, args.device, DTYPES[dtype])
    images = int(vlmfix.get_adapter(tiny.model).image_mask(inputs["input_ids"][:1]).sum())
    print(f"\n{dtype}, batch {batch}: {inputs['input_ids'].shape[1]} prompt tokens per row ({images} image tokens)")
    with tempfile.TemporaryDirectory() as stand_in_dir:  # DCD reads its stand-in checkpoints when it runs
        refused = refused_specs(tiny, args.methods, stand_in_dir)
        for label, reason in refused.items():
            print(f"  {label}: refused by {tiny.family}: {reason}")
        specs = [spec for spec in args.methods if label_of(spec) not in refused]
        results: dict[str, SpeedResult | LockstepResult]
        if args.clock == "lockstep":
            variants = copied_variants(tiny, inputs, {label_of(spec): spec for spec in specs}, stand_in_dir)
            results = {r.label: r for r in measure_lockstep(variants, args.new_tokens, args.repeats)}
        else:
            variants = build_variants(tiny, inputs, specs, stand_in_dir)
            warm_up = build_variants(tiny, batch_inputs(tiny, 1, args.device, DTYPES[dtype]), specs, stand_in_dir)
            results = {r.label: r for r in measure(variants, args.new_tokens, args.repeats, warm_up=warm_up)}
        memory = {label: variant_memory(args, dtype, batch, label, variants[label], specs)
                  for label, r in results.items() if args.memory and not r.failure}
    base = memory.get(GREEDY)
    rows = []
    for label in [*(label for label in results if label not in map(label_of, args.methods)),
                  *map(label_of, args.methods)]:  # greedy and the floor, then the methods in the order asked
        if label in refused:
            nan = math.nan
            rows.append(Row(label, dtype, batch, nan, nan, nan, nan, nan, nan, None, None, None,
                            refused=refused[label], clock=args.clock))
            continue
        r, peak = results[label], memory.get(label)
        memory_ratio = peak / base if peak is not None and base else None
        if isinstance(r, LockstepResult):
            nan = math.nan
            rows.append(Row(r.label, dtype, batch, 1000 * r.seconds_per_token, nan, nan, nan, nan, nan, peak,
                            memory_ratio, r.edited, r.failure, clock="lockstep", paired_ratio=r.paired_ratio,
                            paired_ratio_q1=r.paired_ratio_q1, paired_ratio_q3=r.paired_ratio_q3,
                            summed_ratio=r.summed_ratio))
            continue
        rows.append(Row(r.label, dtype, batch, 1000 * r.seconds_per_token, r.ratio, 1000 * r.fastest_run_seconds,
                        r.fastest_run_ratio, r.wall_seconds / batch,
                        r.wall_ratio, peak, memory_ratio, r.edited, r.failure))
    return rows


def variant_memory(args: argparse.Namespace, dtype: str, batch: int, label: str, fn: GenerateFn,
                   specs: Sequence[str]) -> float | None:
    """Peak MB one call of a variant adds: on CUDA in this process (allocated tensors), on CPU in a fresh
    process (resident set; see benchmarks/speed_memory.py). None, with a printed reason, if it failed."""
    if args.device.startswith("cuda"):
        return peak_growth(lambda: fn(args.new_tokens, TokenClock()), args.device) / 2**20
    job = MemoryJob(args.layers, args.heads, args.head_dim, args.device, dtype, batch, args.new_tokens,
                    tuple(specs), label, torch.get_num_threads(), family=args.family, kv_heads=args.kv_heads)
    result = measure_memory(job)
    if result.peak_bytes is None:
        print(f"  {label}: no peak memory: {result.error}")
        return None
    print(f"  {label}: peak memory measured")
    return result.peak_bytes / 2**20


def _cell(value: float | None, form: str, unit: str = "") -> str:
    return "-" if value is None or math.isnan(value) else format(value, form) + unit


def _interquartile(r: Row) -> str:
    if math.isnan(r.paired_ratio_q1):
        return "-"
    return f"{r.paired_ratio_q1:.3f}-{r.paired_ratio_q3:.3f}x"


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (the runs clock's figures, or the lockstep clock's), then the failed rows'
    reasons."""
    lockstep = any(r.clock == "lockstep" for r in rows)
    if lockstep:
        lines = ["| method | dtype | batch | decode ms/token (mean step) | paired step vs greedy (median) "
                 "| paired IQR | summed steps vs greedy | peak MB | memory vs greedy | edited |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["| method | dtype | batch | decode ms/token | decode vs greedy | fastest run ms/token "
                 "| fastest run vs greedy | wall s/caption | wall vs greedy | peak MB | memory vs greedy | edited |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        edited = {None: "-", True: "yes", False: "no"}[r.edited]
        if r.failure:
            edited = "FAILED"
        elif r.refused:
            edited = "refused"
        if lockstep:
            figures = (f"{_cell(r.paired_ratio, '.3f', 'x')} | {_interquartile(r)} | "
                       f"{_cell(r.summed_ratio, '.3f', 'x')}")
        else:
            figures = (f"{_cell(r.decode_ratio, '.3f', 'x')} | {_cell(r.fastest_run_ms, '.2f')} | "
                       f"{_cell(r.fastest_run_ratio, '.3f', 'x')} | {_cell(r.wall_s_per_caption, '.3f')} | "
                       f"{_cell(r.wall_ratio, '.3f', 'x')}")
        lines.append(f"| {r.variant} | {r.dtype} | {r.batch} | {_cell(r.decode_ms_per_token, '.2f')} | {figures} | "
                     f"{_cell(r.peak_mb, '.1f')} | {_cell(r.memory_ratio, '.2f', 'x')} | {edited} |")
    failed = [f"- {r.variant} ({r.dtype}, batch {r.batch}) failed during its {r.failure}" for r in rows if r.failure]
    refused = sorted({f"- {r.variant} refused: {r.refused}" for r in rows if r.refused})
    notes = failed + refused
    return "\n".join(lines + ([""] + notes if notes else []))


def write_rows(path: Path, rows: Sequence[Row], setup: dict) -> None:
    """`.csv`: one line per row; anything else: JSON with the setup and the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()} for r in rows]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:  # written whole, then moved over the old file: a run stopped mid-write leaves the previous blocks
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"setup": setup, "rows": records}, indent=2))
        os.replace(partial, path)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=SPEED_FAMILIES,
                        help="the model's family: its image-token count, attention layout and key/value grouping")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (default: the family's grouping: llava heads, qwen3_vl heads/4, "
                             "gemma3 heads/2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per caption (at least 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="prompts per generate call")
    parser.add_argument("--methods", nargs="+", default=list(FULL_RUN),
                        help="method specs, name or name:key=value,... (e.g. pai:cfg=False); 'none' is vlmfix with "
                             "no method; default: every registered method where it edits")
    parser.add_argument("--clock", default="runs", choices=CLOCKS,
                        help="runs: medians over interleaved runs, the fastest run and wall time; lockstep: the "
                             "variants take turns token by token, each on its own model copy, and each decode step "
                             "is paired with greedy's (median paired ratio, its IQR, summed-steps ratio; no wall "
                             "time or fastest run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    parser.add_argument("--out", type=Path, help="write the rows to this .json or .csv file")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    if args.quick:  # QUICK's settings as defaults: options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is read between the first and last token)")
    if min(args.batch) < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    if args.kv_heads is not None and (args.kv_heads < 1 or args.heads % args.kv_heads):
        parser.error(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    beam_only = [spec for spec in args.methods if parse_method(spec)[0] in BEAM_SEARCH_METHODS]
    if beam_only:
        parser.error(f"{', '.join(beam_only)} run their own beam search; time them with python -m "
                     f"benchmarks.opera_speed (against plain beam search with the same beams)")
    known = [NO_METHOD, *vlmfix.methods.names()]
    unknown = [spec for spec in args.methods if parse_method(spec)[0] not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = args.heads * args.head_dim
    print(f"{args.family}-shaped model: {args.layers} layers x {args.heads} heads "
          f"({kv_heads_of(args.family, args.heads, args.kv_heads)} key/value) x head_dim {args.head_dim}, "
          f"{IMAGE_TOKENS[args.family]} image tokens per prompt, massive activations planted in dims "
          f"{list(SINK_DIMS)} (VAR tau {sink_tau(hidden):.3g}); {args.new_tokens} new tokens, {args.repeats} repeats, "
          f"{args.clock} clock")
    print(f"device: {device_name(args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"({torch.get_num_interop_threads()} inter-op)")
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    setup |= {"device_name": device_name(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    rows: list[Row] = []
    for dtype in args.dtype:
        tiny = speed_model(args.layers, args.heads, args.head_dim, args.device, DTYPES[dtype], family=args.family,
                           kv_heads=args.kv_heads)
        for batch in args.batch:
            block = run_block(args, tiny, dtype, batch)
            rows += block
            print("\n" + table(block))  # each block as it ends: a run cut short keeps the blocks it finished
            if args.out:
                write_rows(args.out, rows, setup)
        del tiny
    if len(args.dtype) * len(args.batch) > 1:
        print("\nall blocks:\n" + table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r.failure for r in main()) else 0)
