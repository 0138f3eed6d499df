"""Timing of generate variants: per-token decode time and the whole call's wall time, interleaved, with a
check that each method edited something.

One run of a variant is one `generate` call of `n` new tokens (the whole batch). Two clocks read it:
- decode: a streamer's timestamps, (time of token N - time of token 1) / (N - 1): the cost of one decode
  step, without prefill and the methods' prepare passes;
- fastest run: the decode clock of a variant's least-loaded run (its smallest per-run mean step). Load from
  other processes only ever adds time, so this minimum over repeats is moved least by it (as `timeit`
  reports the minimum over repeats); unlike the shortest single step it keeps every step's cost, the
  first decode step's one-time work included;
- wall: `time.perf_counter()` around the whole call (entering the session, spans, every prepare pass,
  prefill, decode, leaving the session), after a CUDA synchronize: what a user pays for the call.
Variants run interleaved (A B C, B C A, C A B, ...) and the decode and wall clocks keep their medians, so a load
change on the machine hits every variant alike. A run whose methods report no edit (`session.report()[name]["applied"]`
all zero) fails its variant: it would time plain decoding under the method's name.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

import vlmfix
from vlmfix.decoding.method import Method
from vlmfix.testing import TinyVLM

# A variant runs one generate call of `n` new tokens reporting each step to `streamer`; it returns the
# vlmfix session it ran in (whose report says what the methods edited), or None for plain generate.
GenerateFn = Callable[[int, BaseStreamer], "vlmfix.Session | None"]
GREEDY = "greedy"
FLOOR = "greedy, 2x rows (two-stream floor)"
WARM_UP_TOKENS = 3


class TokenClock(BaseStreamer):
    """Records when each decoding step's tokens arrive (the first `put` is the prompt)."""

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
class Run:
    """One timed generate call."""

    decode_seconds: float  # per decode step (one token for each row of the batch)
    wall_seconds: float  # the whole call
    edited: bool | None  # None: no method ran (plain generate, or vlmfix with no method)
    why_not: str | None = None  # the methods that edited nothing


@dataclass(frozen=True)
class SpeedResult:
    """A variant's medians over the repeats and their ratios to the baseline (the first variant); a failed
    variant has `failure` set and NaN figures."""

    label: str
    seconds_per_token: float
    ratio: float
    wall_seconds: float = math.nan  # one generate call (the whole batch)
    wall_ratio: float = math.nan
    fastest_run_seconds: float = math.nan  # per decode step, the run with the smallest mean step
    fastest_run_ratio: float = math.nan
    edited: bool | None = None
    failure: str | None = None


def unedited(report: dict[str, Any]) -> str | None:
    """Why a session's methods count as not editing: the methods whose `applied` counts are all zero."""
    idle = {name: entry["applied"] for name, entry in report.items() if not any(entry["applied"].values())}
    if not idle:
        return None
    counts = "; ".join(f"{name}: " + ", ".join(f"{k}=0" for k in applied) for name, applied in idle.items())
    return f"{', '.join(idle)} edited nothing ({counts}): the row would time plain decoding"


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_once(fn: GenerateFn, new_tokens: int) -> Run:
    """Time one call of `fn` with both clocks and read its session's report."""
    clock = TokenClock()
    start = time.perf_counter()
    session = fn(new_tokens, clock)
    synchronize()
    wall = time.perf_counter() - start
    decode = clock.seconds_per_decode_token()
    if session is None or not session.methods:
        return Run(decode, wall, None)
    why_not = unedited(session.report())
    return Run(decode, wall, why_not is None, why_not)


def _attempt(fn: GenerateFn, new_tokens: int) -> Run | str:
    """A run (which may have edited nothing), or the exception that ended it, as text."""
    try:
        return run_once(fn, new_tokens)
    except Exception as error:  # a broken method must not cost the other variants' figures
        return f"{type(error).__name__}: {error}"


def rotated(variants: Mapping[str, GenerateFn], shift: int) -> dict[str, GenerateFn]:
    """`variants` in turn order rotated by `shift`: timed round r starts with the r-th variant, so that over a
    multiple of len(variants) rounds every variant takes every place in the rotation (a step right after a heavier
    one, e.g. the two-row floor's, may find the caches and memory bus in another state) and no place's effect falls
    on one variant alone."""
    labels = list(variants)
    shift %= max(len(labels), 1)
    return {label: variants[label] for label in labels[shift:] + labels[:shift]}


def measure(variants: dict[str, GenerateFn], new_tokens: int, repeats: int,
            progress: Callable[[str], None] = print,
            warm_up: dict[str, GenerateFn] | None = None) -> list[SpeedResult]:
    """Medians of the decode and wall clocks and the fastest run per variant, interleaved over `repeats`; the
    first variant is the baseline. Run r takes the variants in their order rotated by r - 1 (`rotated`), so that
    no variant always runs first after a pause, or right after the heaviest one.

    Each variant first runs a short warm-up call (lazy imports, one-time set-up), through `warm_up[label]` when
    given (the same variant on a cheaper batch), else the variant itself. A variant other than the baseline that
    raises, or whose methods edit nothing, in any call fails: it is reported with the reason and not timed
    further, so one broken method does not cost a whole (GPU) run."""
    live = dict(variants)
    failed: dict[str, SpeedResult] = {}
    runs: dict[str, list[Run]] = {label: [] for label in variants}
    baseline = next(iter(variants))
    phases = [("warm-up run", WARM_UP_TOKENS)] + [(f"run {r + 1}", new_tokens) for r in range(repeats)]
    for number, (phase, tokens) in enumerate(phases):
        for label, fn in rotated(live, max(number - 1, 0)).items():
            outcome = _attempt(warm_up[label] if phase == "warm-up run" and warm_up else fn, tokens)
            failure = outcome if isinstance(outcome, str) else outcome.why_not
            if failure is not None:
                if label == baseline:
                    raise RuntimeError(f"the baseline {label!r} failed: {failure}")
                edited = None if isinstance(outcome, str) else False  # an exception says nothing about edits
                failed[label] = SpeedResult(label, math.nan, math.nan, edited=edited, failure=f"{phase}: {failure}")
                progress(f"  {label}: failed during its {phase}: {failure}; no figure")
                del live[label]
            elif phase != "warm-up run" and not isinstance(outcome, str):
                runs[label].append(outcome)
        if phase != "warm-up run":
            progress(f"  {phase}/{repeats} done")
    return [failed.get(label) or _medians(label, runs[label], runs[baseline]) for label in variants]


def _medians(label: str, runs: list[Run], baseline: list[Run]) -> SpeedResult:
    decode = statistics.median(r.decode_seconds for r in runs)
    wall = statistics.median(r.wall_seconds for r in runs)
    base_decode = statistics.median(r.decode_seconds for r in baseline)
    base_wall = statistics.median(r.wall_seconds for r in baseline)
    fastest = min(r.decode_seconds for r in runs)
    base_fastest = min(r.decode_seconds for r in baseline)
    return SpeedResult(label, decode, decode / base_decode, wall, wall / base_wall, fastest, fastest / base_fastest,
                       edited=runs[0].edited)


def generate_variants(tiny: TinyVLM, inputs: dict, methods: Mapping[str, Sequence[Method]],
                      two_row_floor: bool = False) -> dict[str, GenerateFn]:
    """`greedy` (plain `model.generate`), optionally the two-stream floor (plain `generate` on the batch
    stacked twice, [rows; rows], as a two-stream method stacks its streams), then one variant per method list,
    each run as `with vlmfix.apply(model, *methods) as session: session.generate(...)`; all greedy and of
    fixed length."""
    model = tiny.model
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    fixed = dict(do_sample=False)

    def plain(n: int, streamer: BaseStreamer) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **fixed)

    def plain_two_rows(n: int, streamer: BaseStreamer) -> None:
        model.generate(**doubled, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **fixed)

    def with_methods(ms: Sequence[Method]) -> GenerateFn:
        def run(n: int, streamer: BaseStreamer) -> vlmfix.Session:
            with vlmfix.apply(model, *ms, tokenizer=tiny.processor) as session:
                session.generate(**inputs, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **fixed)
            return session

        return run

    floor = {FLOOR: plain_two_rows} if two_row_floor else {}
    return {GREEDY: plain, **floor, **{label: with_methods(ms) for label, ms in methods.items()}}
